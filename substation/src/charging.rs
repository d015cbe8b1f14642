//! The charging model of one substation: which car draws how much power, and when each car's
//! energy is delivered, on a simulated clock.
//!
//! This is the pure core of the substation stage (ingest → dispatcher → **substation**): no
//! NATS, no clock reads, no randomness. Times are simulated seconds (`f64`) passed in by the
//! caller; the live service maps them to wall time, the simulator drives them directly. Power is
//! piecewise constant between events (an arrival, a completion, a capacity change), so energy is
//! integrated exactly and a completion is reported at the exact instant its energy is delivered.

use evgrid_common::SECONDS_PER_HOUR;
use uuid::Uuid;

/// Energy left below this (kWh) counts as delivered: float noise of integrating power over time.
pub const ENERGY_EPSILON_KWH: f64 = 1e-9;

/// Power below this (kW) is no power at all: a session offered less waits instead of "drawing"
/// a rounding error for ever.
const POWER_EPSILON_KW: f64 = 1e-9;

/// How a substation shares its capacity among the cars it charges (`--allocation`).
///
/// Every policy obeys the same two limits: the sum never exceeds the capacity, and no car gets
/// more than its max power. Issue 3 adds `equal-share`, `edf` and `llf` here.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Allocation {
    /// First come, first served: cars in arrival order each get min(max power, capacity left);
    /// a car offered nothing waits (queued) and starts when power frees up.
    #[default]
    Fcfs,
}

impl Allocation {
    /// Every policy, for sweeps (`--allocation all` in the simulator).
    pub const ALL: [Allocation; 1] = [Allocation::Fcfs];

    /// The name used on the command line and in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Fcfs => "fcfs",
        }
    }
}

/// A car arriving at the substation.
#[derive(Debug, Clone, PartialEq)]
pub struct Arrival {
    pub id: Uuid,
    /// The most the car can draw (kW), > 0.
    pub max_power_kw: f64,
    /// Energy to deliver in this session (kWh); a resumed session passes what is left.
    pub energy_kwh: f64,
    /// When the car wants to leave, simulated seconds. Used by deadline-aware policies; the
    /// model does not end a session at its departure (the caller may [`Station::remove`] it).
    pub departure: Option<f64>,
}

/// A car at the substation, charging or waiting.
#[derive(Debug, Clone, PartialEq)]
pub struct Session {
    pub id: Uuid,
    pub max_power_kw: f64,
    /// Energy this session delivers in total (kWh).
    pub energy_kwh: f64,
    /// Energy delivered so far in this session (kWh).
    pub delivered_kwh: f64,
    /// Simulated seconds.
    pub arrival: f64,
    /// Simulated seconds.
    pub departure: Option<f64>,
    /// Power allocated right now (kW); 0 while queued.
    pub power_kw: f64,
    /// When the session first drew power (simulated seconds).
    pub started_at: Option<f64>,
}

impl Session {
    /// Energy still to deliver (kWh), never negative.
    pub fn remaining_kwh(&self) -> f64 {
        (self.energy_kwh - self.delivered_kwh).max(0.0)
    }

    /// Drawing power right now.
    pub fn is_drawing(&self) -> bool {
        self.power_kw > 0.0
    }

    /// Drawing, but less than the car's max power.
    pub fn is_throttled(&self) -> bool {
        self.is_drawing() && self.power_kw < self.max_power_kw - POWER_EPSILON_KW
    }

    /// When this session completes at its current power (simulated seconds), if it draws.
    fn completion_time(&self, now: f64) -> Option<f64> {
        self.is_drawing()
            .then(|| now + self.remaining_kwh() / self.power_kw * SECONDS_PER_HOUR)
    }
}

/// What happened to which session, and when (simulated seconds).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Event {
    pub id: Uuid,
    pub at: f64,
    pub kind: EventKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// The session drew power for the first time.
    Started,
    /// The session's energy is delivered; it has left the model.
    Completed,
}

/// The numbers a heartbeat (and the metrics) report.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Snapshot {
    pub capacity_kw: f64,
    /// Power drawn now: Σ allocated power, never above `capacity_kw`.
    pub load_kw: f64,
    /// Σ max power of every session, drawing or not.
    pub demand_kw: f64,
    /// Sessions drawing power.
    pub active: u32,
    /// Sessions waiting with no power.
    pub queued: u32,
    /// Sessions drawing less than their max power.
    pub throttled: u32,
    /// Energy delivered by this station since it was created (kWh), including sessions that
    /// completed or left.
    pub delivered_kwh: f64,
}

/// Shares `capacity_kw` among `sessions` (in arrival order) by `policy`: the power of each
/// session, in the same order. Never above the capacity in sum, nor above any car's max power.
pub fn allocate(policy: Allocation, capacity_kw: f64, sessions: &[Session]) -> Vec<f64> {
    match policy {
        Allocation::Fcfs => {
            let mut left = capacity_kw.max(0.0);
            sessions
                .iter()
                .map(|s| {
                    let power = s.max_power_kw.min(left);
                    if power < POWER_EPSILON_KW {
                        return 0.0;
                    }
                    left = (left - power).max(0.0);
                    power
                })
                .collect()
        }
    }
}

/// One substation's sessions on a simulated clock.
#[derive(Debug, Clone)]
pub struct Station {
    capacity_kw: f64,
    policy: Allocation,
    now: f64,
    /// In arrival order (ties: the order [`Station::arrive`] was called in).
    sessions: Vec<Session>,
    /// Energy of sessions no longer here (completed or removed).
    departed_kwh: f64,
}

impl Station {
    /// An empty station at simulated time `now`.
    pub fn new(capacity_kw: f64, policy: Allocation, now: f64) -> Self {
        Self {
            capacity_kw: capacity_kw.max(0.0),
            policy,
            now,
            sessions: Vec::new(),
            departed_kwh: 0.0,
        }
    }

    /// The simulated time the model has reached.
    pub fn now(&self) -> f64 {
        self.now
    }

    pub fn capacity_kw(&self) -> f64 {
        self.capacity_kw
    }

    pub fn policy(&self) -> Allocation {
        self.policy
    }

    /// Sessions in arrival order.
    pub fn sessions(&self) -> &[Session] {
        &self.sessions
    }

    pub fn session(&self, id: Uuid) -> Option<&Session> {
        self.sessions.iter().find(|s| s.id == id)
    }

    /// A car arrives at `at` (not before [`Station::now`]): the clock advances to `at` first,
    /// then power is reallocated. Returns every event up to and including the arrival (a car
    /// with nothing left to charge completes at once).
    pub fn arrive(&mut self, at: f64, car: Arrival) -> Vec<Event> {
        let mut events = self.advance_to(at);
        if car.energy_kwh <= ENERGY_EPSILON_KWH {
            events.push(Event {
                id: car.id,
                at: self.now,
                kind: EventKind::Completed,
            });
            return events;
        }
        self.sessions.push(Session {
            id: car.id,
            max_power_kw: car.max_power_kw,
            energy_kwh: car.energy_kwh,
            delivered_kwh: 0.0,
            arrival: self.now,
            departure: car.departure,
            power_kw: 0.0,
            started_at: None,
        });
        self.reallocate(&mut events);
        events
    }

    /// Advances the clock to `t`, integrating each session's power, completing sessions exactly
    /// when their energy is delivered and reallocating the power they free. Earlier `t`: no-op.
    pub fn advance_to(&mut self, t: f64) -> Vec<Event> {
        let mut events = Vec::new();
        while let Some((at, index)) = self.next_completion().filter(|&(at, _)| at <= t) {
            self.integrate_to(at);
            // The session that set `at` finishes now even if float rounding left a crumb, so the
            // loop always makes progress; others within the epsilon finish with it.
            let first = &mut self.sessions[index];
            first.delivered_kwh = first.energy_kwh;
            let now = self.now;
            let mut finished = Vec::new();
            self.sessions.retain(|s| {
                let done = s.is_drawing() && s.remaining_kwh() <= ENERGY_EPSILON_KWH;
                if done {
                    finished.push((s.id, s.energy_kwh));
                }
                !done
            });
            for (id, energy_kwh) in finished {
                self.departed_kwh += energy_kwh;
                events.push(Event {
                    id,
                    at: now,
                    kind: EventKind::Completed,
                });
            }
            self.reallocate(&mut events);
        }
        self.integrate_to(t);
        events
    }

    /// When the next session completes at the current allocation (simulated seconds), if any
    /// draws power: the live service sleeps exactly until then.
    pub fn next_event_time(&self) -> Option<f64> {
        self.next_completion().map(|(at, _)| at)
    }

    /// Changes the capacity (a grid operator's limit) and reallocates at once.
    pub fn set_capacity(&mut self, capacity_kw: f64) -> Vec<Event> {
        self.capacity_kw = capacity_kw.max(0.0);
        let mut events = Vec::new();
        self.reallocate(&mut events);
        events
    }

    /// Takes a session out before completion (the car leaves, the substation shuts down), with
    /// the energy it got; the power it drew goes to the others.
    pub fn remove(&mut self, id: Uuid) -> Option<(Session, Vec<Event>)> {
        let index = self.sessions.iter().position(|s| s.id == id)?;
        let session = self.sessions.remove(index);
        self.departed_kwh += session.delivered_kwh;
        let mut events = Vec::new();
        self.reallocate(&mut events);
        Some((session, events))
    }

    /// Load, demand, counts and energy right now.
    pub fn snapshot(&self) -> Snapshot {
        let mut snapshot = Snapshot {
            capacity_kw: self.capacity_kw,
            delivered_kwh: self.departed_kwh,
            ..Snapshot::default()
        };
        for s in &self.sessions {
            snapshot.load_kw += s.power_kw;
            snapshot.demand_kw += s.max_power_kw;
            snapshot.delivered_kwh += s.delivered_kwh;
            if s.is_drawing() {
                snapshot.active += 1;
            } else {
                snapshot.queued += 1;
            }
            if s.is_throttled() {
                snapshot.throttled += 1;
            }
        }
        // Rounding of the sum must not show as an overload.
        snapshot.load_kw = snapshot.load_kw.min(self.capacity_kw);
        snapshot
    }

    fn next_completion(&self) -> Option<(f64, usize)> {
        self.sessions
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.completion_time(self.now).map(|at| (at, i)))
            .min_by(|a, b| a.0.total_cmp(&b.0))
    }

    fn integrate_to(&mut self, t: f64) {
        let dt = t - self.now;
        if dt.is_nan() || dt <= 0.0 {
            return;
        }
        for s in &mut self.sessions {
            if s.is_drawing() {
                s.delivered_kwh =
                    (s.delivered_kwh + s.power_kw * dt / SECONDS_PER_HOUR).min(s.energy_kwh);
            }
        }
        self.now = t;
    }

    fn reallocate(&mut self, events: &mut Vec<Event>) {
        let powers = allocate(self.policy, self.capacity_kw, &self.sessions);
        for (s, power) in self.sessions.iter_mut().zip(powers) {
            s.power_kw = power;
            if power > 0.0 && s.started_at.is_none() {
                s.started_at = Some(self.now);
                events.push(Event {
                    id: s.id,
                    at: self.now,
                    kind: EventKind::Started,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    fn car(n: u128, max_power_kw: f64, energy_kwh: f64) -> Arrival {
        Arrival {
            id: Uuid::from_u128(n),
            max_power_kw,
            energy_kwh,
            departure: None,
        }
    }

    fn kinds(events: &[Event]) -> Vec<(u128, EventKind)> {
        events.iter().map(|e| (e.id.as_u128(), e.kind)).collect()
    }

    #[test]
    fn a_single_session_completes_exactly_at_energy_over_power() {
        let mut station = Station::new(150.0, Allocation::Fcfs, 100.0);
        let events = station.arrive(100.0, car(1, 7.0, 10.0));
        assert_eq!(kinds(&events), [(1, EventKind::Started)]);
        let done = 100.0 + 10.0 / 7.0 * 3600.0;
        assert_eq!(station.next_event_time(), Some(done));

        assert!(station.advance_to(done - 1e-6).is_empty());
        let events = station.advance_to(done + 50.0);
        assert_eq!(kinds(&events), [(1, EventKind::Completed)]);
        assert_eq!(events[0].at, done);
        assert!(station.sessions().is_empty());
        assert_eq!(station.snapshot().delivered_kwh, 10.0);
        assert_eq!(station.next_event_time(), None);
    }

    #[test]
    fn queued_sessions_start_when_power_frees() {
        // 20 kW: the first car takes 11, the second the 9 left, the third waits.
        let mut station = Station::new(20.0, Allocation::Fcfs, 0.0);
        station.arrive(0.0, car(1, 11.0, 11.0));
        station.arrive(0.0, car(2, 11.0, 22.0));
        let events = station.arrive(0.0, car(3, 11.0, 11.0));
        assert!(events.is_empty(), "the third car waits: {events:?}");
        let s = station.snapshot();
        assert_eq!((s.load_kw, s.demand_kw), (20.0, 33.0));
        assert_eq!((s.active, s.queued, s.throttled), (2, 1, 1));

        // Car 1 needs exactly one hour at 11 kW; then car 2 gets 11 kW and car 3 the other 9.
        let events = station.advance_to(3600.0);
        assert_eq!(
            kinds(&events),
            [(1, EventKind::Completed), (3, EventKind::Started)]
        );
        assert!(events.iter().all(|e| e.at == 3600.0));
        let powers: Vec<f64> = station.sessions().iter().map(|s| s.power_kw).collect();
        assert_eq!(powers, [11.0, 9.0]);
        // Car 2 got 9 kWh in the first hour and needs 13 kWh more at 11 kW.
        let delivered_2 = station.session(Uuid::from_u128(2)).unwrap().delivered_kwh;
        assert!((delivered_2 - 9.0).abs() < 1e-9);
        let next = station.next_event_time().unwrap();
        assert!((next - (3600.0 + 13.0 / 11.0 * 3600.0)).abs() < 1e-6);
    }

    #[test]
    fn a_car_asking_more_than_capacity_is_throttled_not_refused() {
        let mut station = Station::new(20.0, Allocation::Fcfs, 0.0);
        station.arrive(0.0, car(1, 50.0, 10.0));
        let s = station.snapshot();
        assert_eq!((s.load_kw, s.active, s.throttled), (20.0, 1, 1));
        assert_eq!(station.next_event_time(), Some(10.0 / 20.0 * 3600.0));
    }

    #[test]
    fn capacity_changes_reallocate_at_once() {
        let mut station = Station::new(20.0, Allocation::Fcfs, 0.0);
        station.arrive(0.0, car(1, 20.0, 100.0));
        station.arrive(0.0, car(2, 20.0, 100.0));
        assert!(station.set_capacity(15.0).is_empty());
        let s = station.snapshot();
        assert_eq!(
            (s.load_kw, s.active, s.queued, s.throttled),
            (15.0, 1, 1, 1)
        );

        let events = station.set_capacity(60.0);
        assert_eq!(kinds(&events), [(2, EventKind::Started)]);
        assert_eq!(station.snapshot().load_kw, 40.0);
    }

    #[test]
    fn removing_a_session_keeps_its_energy_and_frees_its_power() {
        let mut station = Station::new(10.0, Allocation::Fcfs, 0.0);
        station.arrive(0.0, car(1, 10.0, 100.0));
        station.arrive(0.0, car(2, 10.0, 100.0));
        station.advance_to(1800.0);
        let (gone, events) = station.remove(Uuid::from_u128(1)).unwrap();
        assert!((gone.delivered_kwh - 5.0).abs() < 1e-9);
        assert_eq!(kinds(&events), [(2, EventKind::Started)]);
        assert!((station.snapshot().delivered_kwh - 5.0).abs() < 1e-9);
        assert!(station.remove(Uuid::from_u128(1)).is_none());
    }

    #[test]
    fn nothing_left_to_charge_completes_on_arrival() {
        let mut station = Station::new(10.0, Allocation::Fcfs, 0.0);
        let events = station.arrive(5.0, car(1, 10.0, 0.0));
        assert_eq!(kinds(&events), [(1, EventKind::Completed)]);
        assert_eq!(events[0].at, 5.0);
        assert!(station.sessions().is_empty());
    }

    #[test]
    fn time_never_runs_backwards() {
        let mut station = Station::new(10.0, Allocation::Fcfs, 100.0);
        station.arrive(50.0, car(1, 10.0, 10.0));
        assert_eq!(station.session(Uuid::from_u128(1)).unwrap().arrival, 100.0);
        station.advance_to(10.0);
        assert_eq!(station.now(), 100.0);
    }

    /// Checks the allocation invariants of the station as it is now.
    fn assert_allocation_holds(station: &Station, context: &str) {
        let sessions = station.sessions();
        let load: f64 = sessions.iter().map(|s| s.power_kw).sum();
        assert!(
            load <= station.capacity_kw() + 1e-9,
            "{context}: load {load} above capacity {}",
            station.capacity_kw()
        );
        for (i, s) in sessions.iter().enumerate() {
            assert!(s.power_kw >= 0.0, "{context}: negative power");
            assert!(
                s.power_kw <= s.max_power_kw + 1e-12,
                "{context}: power above the car's max"
            );
            // FCFS is work-conserving and ordered: nobody waits or is throttled while capacity
            // is idle, and no later car draws while an earlier one is short of its max.
            if s.power_kw < s.max_power_kw - 1e-9 {
                assert!(
                    load >= station.capacity_kw() - 1e-6,
                    "{context}: car {i} is short while capacity is idle"
                );
                assert!(
                    sessions[i + 1..].iter().all(|later| later.power_kw == 0.0),
                    "{context}: a later car draws before car {i} is served"
                );
            }
        }
    }

    /// Many random workloads (fixed seed): arrivals at random times with random energy and max
    /// power, random capacity changes. At every instant the allocation holds; the energy
    /// delivered equals the integral of the load; every completed session got exactly its energy.
    #[test]
    fn random_workloads_never_exceed_capacity_and_conserve_energy() {
        let mut rng = StdRng::seed_from_u64(0x6576_6772_6964);
        for workload in 0..300 {
            let capacity = rng.random_range(5.0..200.0);
            let mut station = Station::new(capacity, Allocation::Fcfs, 0.0);
            let mut arrivals: Vec<(f64, Arrival)> = (0..rng.random_range(1..40u128))
                .map(|n| {
                    let at = rng.random_range(0.0..4.0 * 3600.0);
                    let max_power = rng.random_range(1.0..350.0);
                    let energy = rng.random_range(0.5..120.0);
                    (at, car(n, max_power, energy))
                })
                .collect();
            arrivals.sort_by(|a, b| a.0.total_cmp(&b.0));
            let requested: std::collections::HashMap<Uuid, f64> =
                arrivals.iter().map(|(_, a)| (a.id, a.energy_kwh)).collect();
            let mut capacity_changes: Vec<(f64, f64)> = (0..rng.random_range(0..4))
                .map(|_| {
                    (
                        rng.random_range(0.0..6.0 * 3600.0),
                        rng.random_range(1.0..200.0),
                    )
                })
                .collect();
            capacity_changes.sort_by(|a, b| a.0.total_cmp(&b.0));

            let mut integrated_kwh = 0.0;
            let mut completed = 0;
            let mut started = std::collections::HashSet::new();
            let (mut next_arrival, mut next_change) = (0, 0);
            let mut check = |events: Vec<Event>, station: &Station| {
                for e in events {
                    match e.kind {
                        EventKind::Started => assert!(started.insert(e.id), "started twice"),
                        EventKind::Completed => {
                            completed += 1;
                            assert!(station.session(e.id).is_none());
                        }
                    }
                }
                assert_allocation_holds(station, &format!("workload {workload}"));
            };
            loop {
                // Step to the next event of any kind, so the load is constant within each step
                // and the integral below is exact.
                let candidates = [
                    station.next_event_time(),
                    arrivals.get(next_arrival).map(|a| a.0),
                    capacity_changes.get(next_change).map(|c| c.0),
                ];
                let Some(t) = candidates.into_iter().flatten().min_by(f64::total_cmp) else {
                    break;
                };
                let t = t.max(station.now());
                integrated_kwh += station.snapshot().load_kw * (t - station.now()) / 3600.0;
                let events = station.advance_to(t);
                check(events, &station);
                while arrivals.get(next_arrival).is_some_and(|a| a.0 <= t) {
                    let events = station.arrive(t, arrivals[next_arrival].1.clone());
                    next_arrival += 1;
                    check(events, &station);
                }
                while capacity_changes.get(next_change).is_some_and(|c| c.0 <= t) {
                    let events = station.set_capacity(capacity_changes[next_change].1);
                    next_change += 1;
                    check(events, &station);
                }
            }
            assert_eq!(completed, requested.len(), "workload {workload}");
            assert!(station.sessions().is_empty());
            let total: f64 = requested.values().sum();
            let delivered = station.snapshot().delivered_kwh;
            assert!(
                (delivered - total).abs() <= 1e-9 * total.max(1.0),
                "workload {workload}: delivered {delivered} of {total}"
            );
            assert!(
                (integrated_kwh - total).abs() <= 1e-6 * total.max(1.0),
                "workload {workload}: integral of load {integrated_kwh} vs {total}"
            );
        }
    }
}
