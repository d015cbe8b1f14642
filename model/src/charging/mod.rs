//! The charging model of one substation: which car draws how much power, and when each car's
//! energy is delivered or the car leaves, on a simulated clock.
//!
//! This is the pure core of the substation stage (ingest → dispatcher → **substation**): no
//! NATS, no clock reads, no randomness. Times are simulated seconds (`f64`) passed in by the
//! caller; the live service maps them to wall time, the simulator (`evgrid sim`) drives them
//! directly. Power is piecewise constant between events (an arrival, a completion, a departure,
//! a capacity change, a periodic re-allocation), so energy is integrated exactly and a
//! completion is reported at the exact instant its energy is delivered.
//!
//! How the capacity is shared when the cars want more is the [`Allocation`] policy, a pure
//! function of the sessions and the time ([`allocate`]). The allocation is recomputed on every
//! arrival, completion, departure and capacity change, and at least every
//! [`REALLOCATE_EVERY_S`] simulated seconds.

use crate::SECONDS_PER_HOUR;
use crate::messages::{PROJECTION_HORIZONS_S, Projection};
use uuid::Uuid;

mod allocation;

pub use allocation::{Allocation, allocate};
use allocation::{Scratch, allocate_into};

/// Energy left below this (kWh) counts as delivered: float noise of integrating power over time.
pub const ENERGY_EPSILON_KWH: f64 = 1e-9;

/// Power below this (kW) is no power at all: a session offered less waits instead of "drawing"
/// a rounding error for ever.
const POWER_EPSILON_KW: f64 = 1e-9;

/// The allocation is recomputed at least this often, in simulated seconds. Only `llf` depends on
/// the time between events (laxity falls while a car waits); for the other policies such a
/// re-allocation gives the same powers again, so the model skips computing it.
pub const REALLOCATE_EVERY_S: f64 = 60.0;

/// A load above the capacity by more than this fraction (plus [`POWER_EPSILON_KW`]) is an
/// overload in [`Stats::overloads`]; below it is float rounding of the sum.
const OVERLOAD_TOLERANCE: f64 = 1e-9;

/// A car arriving at the substation.
#[derive(Debug, Clone, PartialEq)]
pub struct Arrival {
    pub id: Uuid,
    /// The most the car can draw (kW), > 0.
    pub max_power_kw: f64,
    /// Energy to deliver in this session (kWh); a resumed session passes what is left.
    pub energy_kwh: f64,
    /// When the car leaves, simulated seconds: the session ends then with what it got.
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
    /// Power fixed from outside rather than allocated ([`Station::pin`]): a car not yet
    /// plugged in (0), or a charger that cannot be trusted to keep a limit (its worst case).
    pub pinned_kw: Option<f64>,
    /// Its energy comes from a meter ([`Station::meter`]), and only from there (the model
    /// does not integrate it between readings, which would run ahead of a lagging meter and
    /// flip its power on and off); the car, not the model, decides when the session ends, so
    /// it neither completes nor departs on its own.
    pub metered: bool,
    /// `delivered_kwh` when the power last changed, and when that was: energy is integrated from
    /// there, so the model's state at a time does not depend on how often it was advanced.
    base_kwh: f64,
    since: f64,
}

impl Session {
    /// Energy still to deliver (kWh), never negative.
    pub fn remaining_kwh(&self) -> f64 {
        (self.energy_kwh - self.delivered_kwh).max(0.0)
    }

    /// Metered, and its meter shows all its energy: it gets no more power.
    pub fn is_full(&self) -> bool {
        self.metered && self.remaining_kwh() <= ENERGY_EPSILON_KWH
    }

    /// The power this session is held at whatever the policy says, if any.
    fn held_kw(&self) -> Option<f64> {
        self.pinned_kw.or(self.is_full().then_some(0.0))
    }

    /// Drawing power right now.
    pub fn is_drawing(&self) -> bool {
        self.power_kw > 0.0
    }

    /// Drawing, but less than the car's max power.
    pub fn is_throttled(&self) -> bool {
        self.is_drawing() && self.power_kw < self.max_power_kw - POWER_EPSILON_KW
    }

    /// Seconds this car can still wait at `now` and be full at its departure at its max power
    /// (negative: it cannot be full any more); infinite without a departure.
    pub fn laxity(&self, now: f64) -> f64 {
        match self.departure {
            Some(departure) => {
                departure - now - self.remaining_kwh() / self.max_power_kw * SECONDS_PER_HOUR
            }
            None => f64::INFINITY,
        }
    }

    /// When this session completes at its current power (simulated seconds), if it draws and
    /// is not metered.
    fn completion_time(&self, now: f64) -> Option<f64> {
        (self.is_drawing() && !self.metered)
            .then(|| now + self.remaining_kwh() / self.power_kw * SECONDS_PER_HOUR)
    }
}

/// What happened to which session, and when (simulated seconds).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Event {
    pub id: Uuid,
    pub at: f64,
    pub kind: EventKind,
    /// Energy delivered in this session when the event happened (kWh): all of it on
    /// `Completed`, what the car got on `Departed`.
    pub delivered_kwh: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// The session drew power for the first time.
    Started,
    /// The session's energy is delivered; it has left the model.
    Completed,
    /// The car left at its departure before its energy was delivered; it has left the model.
    Departed,
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

/// What the station has seen of its own load since it was created, checked at every
/// re-allocation (the load only changes then).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Stats {
    /// Highest Σ allocated power (kW).
    pub peak_load_kw: f64,
    /// Highest Σ allocated power ÷ capacity.
    pub peak_utilization: f64,
    /// Re-allocations that drew more than the capacity: 0, unless the model is broken.
    pub overloads: u64,
}

/// The load from `at` until the next point of a station's load log.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoadPoint {
    pub at: f64,
    pub load_kw: f64,
    pub capacity_kw: f64,
}

/// The terms of [`Station::earliest_end`] at a re-allocation: a car at power p of max m, with r
/// kWh left, cannot complete before `now + r / m` hours, which grows by `1 − p / m` per second
/// while its power holds. Kept per kind of car, so the bound costs O(1) to read.
#[derive(Debug, Clone, Copy, PartialEq)]
struct EarliestEnds {
    /// Departures, and completions of cars at their max power (they do not move).
    fixed: f64,
    /// Cars drawing less than their max: the earliest completion at the re-allocation, and the
    /// least rate at which any of them moves later.
    throttled: f64,
    throttled_slope: f64,
    /// Cars drawing nothing: they move later one second per second.
    paused: f64,
}

impl Default for EarliestEnds {
    fn default() -> Self {
        Self {
            fixed: f64::INFINITY,
            throttled: f64::INFINITY,
            throttled_slope: 1.0,
            paused: f64::INFINITY,
        }
    }
}

impl EarliestEnds {
    fn add(&mut self, s: &Session, now: f64) {
        if let Some(d) = s.departure {
            self.fixed = self.fixed.min(d);
        }
        let full = now + s.remaining_kwh() / s.max_power_kw * SECONDS_PER_HOUR;
        if s.power_kw >= s.max_power_kw {
            self.fixed = self.fixed.min(full);
        } else if s.power_kw > 0.0 {
            self.throttled = self.throttled.min(full);
            self.throttled_slope = self.throttled_slope.min(1.0 - s.power_kw / s.max_power_kw);
        } else {
            self.paused = self.paused.min(full);
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
    /// The next completion at the current allocation: (when, index in `sessions`).
    next_completion: Option<(f64, usize)>,
    /// The earliest departure of the sessions here.
    next_departure: Option<f64>,
    /// See [`Station::earliest_end`]: its terms as of the last re-allocation.
    ends: EarliestEnds,
    /// When the allocation was last computed.
    allocated_at: f64,
    stats: Stats,
    load_log: Option<Vec<LoadPoint>>,
    scratch: Scratch,
    powers: Vec<f64>,
    /// The sessions the policy shares power among when some are pinned, their indices and
    /// powers (kept to be reused: with real chargers every reallocation goes this way).
    free: Vec<Session>,
    free_index: Vec<usize>,
    free_powers: Vec<f64>,
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
            next_completion: None,
            next_departure: None,
            ends: EarliestEnds::default(),
            allocated_at: now,
            stats: Stats::default(),
            load_log: None,
            scratch: Scratch::default(),
            powers: Vec::new(),
            free: Vec::new(),
            free_index: Vec::new(),
            free_powers: Vec::new(),
        }
    }

    /// Keeps a log of the load from now on ([`Station::load_log`]), for plots.
    pub fn record_load(&mut self) {
        self.load_log.get_or_insert_with(Vec::new);
    }

    /// Every change of load or capacity since [`Station::record_load`], in time order.
    pub fn load_log(&self) -> &[LoadPoint] {
        self.load_log.as_deref().unwrap_or_default()
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

    /// When the allocation in force was computed (simulated seconds).
    pub fn allocated_at(&self) -> f64 {
        self.allocated_at
    }

    /// Peak load and overloads seen so far.
    pub fn stats(&self) -> Stats {
        self.stats
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
    /// with nothing left to charge completes at once; one whose departure has passed leaves at
    /// once).
    pub fn arrive(&mut self, at: f64, car: Arrival) -> Vec<Event> {
        self.arrive_pinned(at, car, None)
    }

    /// [`Station::arrive`] for a car whose power is fixed from the start (`pinned_kw`, see
    /// [`Station::pin`]): e.g. 0 for a car that is expected but not plugged in yet, which holds
    /// its place (and leaves at its departure) without drawing.
    pub fn arrive_pinned(&mut self, at: f64, car: Arrival, pinned_kw: Option<f64>) -> Vec<Event> {
        let mut events = self.advance_to(at);
        let leave = |kind| Event {
            id: car.id,
            at: self.now,
            kind,
            delivered_kwh: 0.0,
        };
        if car.energy_kwh <= ENERGY_EPSILON_KWH {
            events.push(leave(EventKind::Completed));
            return events;
        }
        if car.departure.is_some_and(|d| d <= self.now) {
            events.push(leave(EventKind::Departed));
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
            pinned_kw,
            metered: false,
            base_kwh: 0.0,
            since: self.now,
        });
        self.reallocate(&mut events);
        events
    }

    /// Fixes a session's power at `pinned_kw` (counted first against the capacity; the policy
    /// shares what is left among the others), or gives it back to the policy (`None`), and
    /// reallocates. The live substation pins a car not plugged in yet at 0, and a charger that
    /// ignores its limits or is out of reach at the most it can draw. `None` for an unknown id.
    pub fn pin(&mut self, id: Uuid, pinned_kw: Option<f64>) -> Option<Vec<Event>> {
        let index = self.sessions.iter().position(|s| s.id == id)?;
        self.sessions[index].pinned_kw = pinned_kw.map(|p| p.max(0.0));
        let mut events = Vec::new();
        self.reallocate(&mut events);
        Some(events)
    }

    /// A meter's reading of the energy a session has had (kWh, the truth: it replaces the
    /// model's integration), and from now on the session is metered: it ends only when taken
    /// out ([`Station::remove`]). Also the car's own account of what it needs and when it
    /// leaves, when it gives one (`need`: total energy kWh, departure). Reallocates. `None` for
    /// an unknown id.
    pub fn meter(
        &mut self,
        id: Uuid,
        delivered_kwh: f64,
        need: Option<(f64, Option<f64>)>,
    ) -> Option<Vec<Event>> {
        let index = self.sessions.iter().position(|s| s.id == id)?;
        let s = &mut self.sessions[index];
        let (was_metered, was_full) = (s.metered, s.is_full());
        s.metered = true;
        if let Some((energy_kwh, departure)) = need {
            s.energy_kwh = energy_kwh.max(0.0);
            s.departure = departure.or(s.departure);
        }
        s.delivered_kwh = delivered_kwh.clamp(0.0, s.energy_kwh);
        let mut events = Vec::new();
        // A reading alone changes the allocation only when the car becomes full or short
        // again: between events the model's own integration does not reallocate either, and a
        // thousand stations each reporting every second would otherwise reallocate a
        // thousand times a second.
        if !was_metered || need.is_some() || s.is_full() != was_full {
            self.reallocate(&mut events);
        }
        Some(events)
    }

    /// Advances the clock to `t`, integrating each session's power, completing sessions exactly
    /// when their energy is delivered, letting cars leave at their departure, and reallocating
    /// the power they free (and at least every [`REALLOCATE_EVERY_S`]). Earlier `t`: no-op.
    pub fn advance_to(&mut self, t: f64) -> Vec<Event> {
        let mut events = Vec::new();
        while let Some(at) = self.next_event_time().filter(|&at| at <= t) {
            let at = at.max(self.now);
            self.integrate_to(at);
            if let Some((due, index)) = self.next_completion
                && due <= at
            {
                // The session that set `due` finishes now even if float rounding left a crumb,
                // so the loop always makes progress; others within the epsilon finish with it.
                let first = &mut self.sessions[index];
                first.delivered_kwh = first.energy_kwh;
            }
            let now = self.now;
            let mut ended = 0.0;
            self.sessions.retain(|s| {
                if s.metered {
                    return true;
                }
                let kind = if s.is_drawing() && s.remaining_kwh() <= ENERGY_EPSILON_KWH {
                    EventKind::Completed
                } else if s.departure.is_some_and(|d| d <= now) {
                    EventKind::Departed
                } else {
                    return true;
                };
                let delivered_kwh = match kind {
                    EventKind::Completed => s.energy_kwh,
                    _ => s.delivered_kwh,
                };
                ended += delivered_kwh;
                events.push(Event {
                    id: s.id,
                    at: now,
                    kind,
                    delivered_kwh,
                });
                false
            });
            self.departed_kwh += ended;
            self.reallocate(&mut events);
        }
        self.integrate_to(t);
        events
    }

    /// When the model next changes on its own (simulated seconds): the next completion at the
    /// current allocation, the next departure, or the next periodic re-allocation of a
    /// time-dependent policy. The live service sleeps exactly until then.
    pub fn next_event_time(&self) -> Option<f64> {
        let tick = (self.policy.depends_on_time() && !self.sessions.is_empty())
            .then_some(self.allocated_at + REALLOCATE_EVERY_S);
        [
            self.next_completion.map(|(at, _)| at),
            self.next_departure,
            tick,
        ]
        .into_iter()
        .flatten()
        .min_by(f64::total_cmp)
    }

    /// No session can end before this (simulated seconds): the earliest departure, or the
    /// earliest completion were every car to draw its max power from now on. Until then the set
    /// of sessions, and so the demand, stays as it is (barring arrivals). A lower bound, exact
    /// for cars at full power or paused, in O(1).
    pub fn earliest_end(&self) -> Option<f64> {
        let since = (self.now - self.allocated_at).max(0.0);
        let e = &self.ends;
        let end = e
            .fixed
            .min(e.throttled + e.throttled_slope * since)
            .min(e.paused + since);
        end.is_finite().then_some(end)
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

    /// What the sessions still need, by departure ([`Projection`], for the heartbeat): each
    /// session's remaining energy, capped at what its max power can still deliver before it
    /// leaves, summed per horizon of [`PROJECTION_HORIZONS_S`].
    pub fn projection(&self) -> Projection {
        let mut due_kwh = vec![0.0; PROJECTION_HORIZONS_S.len()];
        let mut remaining_kwh = 0.0;
        for s in &self.sessions {
            let Some(departure) = s.departure else {
                remaining_kwh += s.remaining_kwh();
                continue;
            };
            let left_s = (departure - self.now).max(0.0);
            let kwh = s
                .remaining_kwh()
                .min(s.max_power_kw * left_s / SECONDS_PER_HOUR);
            remaining_kwh += kwh;
            if let Some(k) = PROJECTION_HORIZONS_S.iter().position(|&h| left_s <= h) {
                due_kwh[k] += kwh;
            }
        }
        let mut cumulative = 0.0;
        for due in &mut due_kwh {
            cumulative += *due;
            *due = cumulative;
        }
        Projection {
            horizons_s: PROJECTION_HORIZONS_S.to_vec(),
            due_kwh,
            remaining_kwh,
        }
    }

    fn integrate_to(&mut self, t: f64) {
        let dt = t - self.now;
        if dt.is_nan() || dt <= 0.0 {
            return;
        }
        for s in &mut self.sessions {
            if s.is_drawing() && !s.metered {
                s.delivered_kwh =
                    (s.base_kwh + s.power_kw * (t - s.since) / SECONDS_PER_HOUR).min(s.energy_kwh);
            }
        }
        self.now = t;
    }

    /// Recomputes every session's power, the next completion and departure, and the stats.
    fn reallocate(&mut self, events: &mut Vec<Event>) {
        let now = self.now;
        self.allocated_at = now;
        self.powers.clear();
        self.powers.resize(self.sessions.len(), 0.0);
        if self.sessions.iter().any(|s| s.held_kw().is_some()) {
            self.allocate_around_pins(now);
        } else {
            allocate_into(
                self.policy,
                self.capacity_kw,
                &self.sessions,
                now,
                &mut self.scratch,
                &mut self.powers,
            );
        }
        let mut load_kw = 0.0;
        let mut next_completion: Option<(f64, usize)> = None;
        let mut next_departure: Option<f64> = None;
        let mut ends = EarliestEnds::default();
        for (i, (s, &power)) in self.sessions.iter_mut().zip(&self.powers).enumerate() {
            s.power_kw = power;
            s.base_kwh = s.delivered_kwh;
            s.since = now;
            load_kw += power;
            if power > 0.0 && s.started_at.is_none() {
                s.started_at = Some(now);
                events.push(Event {
                    id: s.id,
                    at: now,
                    kind: EventKind::Started,
                    delivered_kwh: s.delivered_kwh,
                });
            }
            if let Some(at) = s.completion_time(now)
                && next_completion.is_none_or(|(best, _)| at < best)
            {
                next_completion = Some((at, i));
            }
            if let Some(d) = s.departure.filter(|_| !s.metered)
                && next_departure.is_none_or(|best| d < best)
            {
                next_departure = Some(d);
            }
            ends.add(s, now);
        }
        self.next_completion = next_completion;
        self.next_departure = next_departure;
        self.ends = ends;
        self.observe_load(load_kw);
    }

    /// The allocation when some sessions are held at a power: theirs first, then the policy
    /// shares what is left among the others (copied out, so the policies stay as they are).
    fn allocate_around_pins(&mut self, now: f64) {
        self.free.clear();
        self.free_index.clear();
        let mut left = self.capacity_kw;
        for (i, s) in self.sessions.iter().enumerate() {
            match s.held_kw() {
                Some(kw) => {
                    self.powers[i] = kw;
                    left -= kw;
                }
                None => {
                    self.free.push(s.clone());
                    self.free_index.push(i);
                }
            }
        }
        self.free_powers.clear();
        self.free_powers.resize(self.free.len(), 0.0);
        allocate_into(
            self.policy,
            left.max(0.0),
            &self.free,
            now,
            &mut self.scratch,
            &mut self.free_powers,
        );
        for (&i, &power) in self.free_index.iter().zip(&self.free_powers) {
            self.powers[i] = power;
        }
    }

    fn observe_load(&mut self, load_kw: f64) {
        let stats = &mut self.stats;
        stats.peak_load_kw = stats.peak_load_kw.max(load_kw);
        if self.capacity_kw > 0.0 {
            stats.peak_utilization = stats.peak_utilization.max(load_kw / self.capacity_kw);
        }
        if load_kw > self.capacity_kw * (1.0 + OVERLOAD_TOLERANCE) + POWER_EPSILON_KW {
            stats.overloads += 1;
        }
        if let Some(log) = &mut self.load_log {
            let point = LoadPoint {
                at: self.now,
                load_kw,
                capacity_kw: self.capacity_kw,
            };
            match log.last_mut() {
                Some(last) if last.load_kw == load_kw && last.capacity_kw == self.capacity_kw => {}
                Some(last) if last.at == point.at => *last = point,
                _ => log.push(point),
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
    fn pinned_sessions_take_their_power_first_and_the_policy_shares_the_rest() {
        let mut station = Station::new(30.0, Allocation::Fcfs, 0.0);
        // Expected but not plugged in: holds its place, draws nothing, starts nothing.
        let events = station.arrive_pinned(0.0, car(1, 22.0, 10.0), Some(0.0));
        assert!(events.is_empty(), "{events:?}");
        station.arrive(0.0, car(2, 22.0, 10.0));
        station.arrive(0.0, car(3, 22.0, 10.0));
        let power = |st: &Station, n| st.session(Uuid::from_u128(n)).unwrap().power_kw;
        assert_eq!(
            [power(&station, 1), power(&station, 2), power(&station, 3)],
            [0.0, 22.0, 8.0]
        );
        // A charger that cannot be trusted is counted at its worst case; the others give way.
        station.pin(Uuid::from_u128(3), Some(22.0)).unwrap();
        assert_eq!([power(&station, 2), power(&station, 3)], [8.0, 22.0]);
        assert!(station.snapshot().load_kw <= 30.0);
        // Unpinned: the policy decides again, and the car plugged in at last starts.
        station.pin(Uuid::from_u128(3), None).unwrap();
        let events = station.pin(Uuid::from_u128(1), None).unwrap();
        assert_eq!(kinds(&events), [(1, EventKind::Started)]);
        assert_eq!(
            [power(&station, 1), power(&station, 2), power(&station, 3)],
            [22.0, 8.0, 0.0]
        );
        assert!(station.pin(Uuid::from_u128(9), None).is_none());
    }

    #[test]
    fn an_expected_car_that_never_comes_leaves_at_its_departure_with_nothing() {
        let mut station = Station::new(30.0, Allocation::Fcfs, 0.0);
        let mut c = car(1, 22.0, 10.0);
        c.departure = Some(100.0);
        station.arrive_pinned(0.0, c, Some(0.0));
        let events = station.advance_to(200.0);
        assert_eq!(kinds(&events), [(1, EventKind::Departed)]);
        assert_eq!(events[0].delivered_kwh, 0.0);
    }

    #[test]
    fn metered_sessions_follow_their_meter_and_stay_until_taken_out() {
        let mut station = Station::new(11.0, Allocation::Fcfs, 0.0);
        let mut c = car(1, 11.0, 11.0);
        c.departure = Some(1800.0);
        station.arrive(0.0, c);
        station.meter(Uuid::from_u128(1), 0.0, None).unwrap();
        // Only the meter moves its energy: no completion is foreseen, and past its departure
        // it stays (the car decides).
        assert_eq!(station.next_event_time(), None);
        assert!(station.advance_to(10_000.0).is_empty());
        let s = station.session(Uuid::from_u128(1)).unwrap();
        assert_eq!((s.delivered_kwh, s.power_kw), (0.0, 11.0));
        station.meter(Uuid::from_u128(1), 2.0, None).unwrap();
        assert_eq!(
            station.session(Uuid::from_u128(1)).unwrap().delivered_kwh,
            2.0
        );
        // Full by its meter: no more power. The car's own need replaces the request's.
        station.meter(Uuid::from_u128(1), 11.0, None).unwrap();
        let s = station.session(Uuid::from_u128(1)).unwrap();
        assert!(s.is_full() && s.power_kw == 0.0);
        station
            .meter(Uuid::from_u128(1), 8.0, Some((12.0, None)))
            .unwrap();
        assert_eq!(station.session(Uuid::from_u128(1)).unwrap().power_kw, 11.0);
        let (session, _) = station.remove(Uuid::from_u128(1)).unwrap();
        assert_eq!(session.delivered_kwh, 8.0);
        assert_eq!(station.snapshot().delivered_kwh, 8.0);
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

    fn car_leaving(n: u128, max_power_kw: f64, energy_kwh: f64, departure: f64) -> Arrival {
        Arrival {
            departure: Some(departure),
            ..car(n, max_power_kw, energy_kwh)
        }
    }

    fn powers(station: &Station) -> Vec<f64> {
        station.sessions().iter().map(|s| s.power_kw).collect()
    }

    #[test]
    fn equal_share_fills_water_to_one_level_and_redistributes_what_capped_cars_leave() {
        let sessions: Vec<Session> = [(1, 3.0), (2, 50.0), (3, 11.0), (4, 50.0)]
            .map(|(n, max)| {
                let mut station = Station::new(0.0, Allocation::EqualShare, 0.0);
                station.arrive(0.0, car(n, max, 10.0));
                station.sessions()[0].clone()
            })
            .to_vec();
        // 60 kW over 4 cars: 15 each, but car 1 takes only 3 and car 3 only 11; the other two
        // share the rest equally.
        assert_eq!(
            allocate(Allocation::EqualShare, 60.0, &sessions, 0.0),
            [3.0, 23.0, 11.0, 23.0]
        );
        // Plenty: everyone at max.
        assert_eq!(
            allocate(Allocation::EqualShare, 500.0, &sessions, 0.0),
            [3.0, 50.0, 11.0, 50.0]
        );
    }

    #[test]
    fn edf_serves_the_earliest_departure_first() {
        let mut station = Station::new(10.0, Allocation::Edf, 0.0);
        station.arrive(0.0, car_leaving(1, 10.0, 10.0, 8.0 * 3600.0));
        station.arrive(0.0, car(2, 10.0, 10.0));
        station.arrive(0.0, car_leaving(3, 10.0, 10.0, 2.0 * 3600.0));
        assert_eq!(powers(&station), [0.0, 0.0, 10.0]);
        // Car 3 is full after an hour; then car 1 (leaving at 8 h) before car 2 (never).
        station.advance_to(3600.0);
        assert_eq!(powers(&station), [10.0, 0.0]);
    }

    #[test]
    fn llf_serves_the_least_laxity_first_and_rechecks_every_minute() {
        let mut station = Station::new(10.0, Allocation::Llf, 0.0);
        // Car 2: 4 h left, needs 2.5 h at 10 kW: laxity 1.5 h. Car 1: 3 h left, needs 1 h at
        // 10 kW: laxity 2 h. Car 2 goes first though it leaves later (EDF would pick car 1).
        station.arrive(0.0, car_leaving(2, 10.0, 25.0, 4.0 * 3600.0));
        station.arrive(0.0, car_leaving(1, 10.0, 10.0, 3.0 * 3600.0));
        assert_eq!(powers(&station), [10.0, 0.0]);
        assert_eq!(station.next_event_time(), Some(REALLOCATE_EVERY_S));
        // While car 1 waits its laxity falls; car 2's stays 1.5 h. At 30 min they tie (car 2
        // keeps the power: it came first); at the next minute's re-allocation car 1 takes over.
        let events = station.advance_to(1800.0);
        assert!(events.is_empty(), "{events:?}");
        let events = station.advance_to(1900.0);
        assert_eq!(kinds(&events), [(1, EventKind::Started)]);
        assert_eq!(events[0].at, 1800.0 + REALLOCATE_EVERY_S);
        assert_eq!(powers(&station), [0.0, 10.0]);
        // No tick is scheduled for policies whose allocation cannot change with time alone.
        let mut edf = Station::new(10.0, Allocation::Edf, 0.0);
        edf.arrive(0.0, car_leaving(1, 5.0, 10.0, 3.0 * 3600.0));
        assert_eq!(edf.next_event_time(), Some(2.0 * 3600.0));
    }

    #[test]
    fn a_car_leaves_at_its_departure_with_what_it_got() {
        let mut station = Station::new(10.0, Allocation::Fcfs, 0.0);
        station.arrive(0.0, car_leaving(1, 10.0, 30.0, 7200.0));
        station.arrive(0.0, car_leaving(2, 10.0, 5.0, 9000.0));
        assert_eq!(station.next_event_time(), Some(7200.0));
        let events = station.advance_to(7200.0);
        assert_eq!(
            kinds(&events),
            [(1, EventKind::Departed), (2, EventKind::Started)]
        );
        assert!((events[0].delivered_kwh - 20.0).abs() < 1e-9);
        // Car 2 needs 30 min at 10 kW; it has 30 min left: full just in time.
        let events = station.advance_to(9000.0);
        assert_eq!(kinds(&events), [(2, EventKind::Completed)]);
        assert_eq!(events[0].delivered_kwh, 5.0);
        assert!((station.snapshot().delivered_kwh - 25.0).abs() < 1e-9);
        // A car whose departure has passed leaves at once, with nothing.
        let events = station.arrive(9100.0, car_leaving(3, 10.0, 5.0, 9000.0));
        assert_eq!(kinds(&events), [(3, EventKind::Departed)]);
        assert!(station.sessions().is_empty());
    }

    #[test]
    fn the_projection_sums_what_is_due_by_each_horizon() {
        let mut station = Station::new(100.0, Allocation::Edf, 1000.0);
        // Due in 10 min, needs 5 kWh: at 10 kW it can still take 1.67 kWh, so that counts.
        station.arrive(1000.0, car_leaving(1, 10.0, 5.0, 1600.0));
        // Due in 2 h, 20 kWh (deliverable: 2 h at 11 kW is 22 kWh).
        station.arrive(1000.0, car_leaving(2, 11.0, 20.0, 1000.0 + 7200.0));
        // No departure: only in the total.
        station.arrive(1000.0, car(3, 7.0, 30.0));
        let p = station.projection();
        assert_eq!(p.horizons_s, PROJECTION_HORIZONS_S);
        let first = 10.0 * 600.0 / 3600.0;
        assert!((p.due_kwh[0] - 0.0).abs() < 1e-9, "{p:?}");
        assert!((p.due_kwh[1] - first).abs() < 1e-9, "{p:?}");
        assert!((p.due_kwh[4] - (first + 20.0)).abs() < 1e-9, "{p:?}");
        assert_eq!(p.due_kwh[10], p.due_kwh[4]);
        assert!((p.remaining_kwh - (first + 20.0 + 30.0)).abs() < 1e-9);
    }

    #[test]
    fn stats_and_the_load_log_follow_every_reallocation() {
        let mut station = Station::new(20.0, Allocation::EqualShare, 0.0);
        station.record_load();
        station.arrive(0.0, car(1, 11.0, 11.0));
        station.arrive(600.0, car(2, 11.0, 11.0));
        station.set_capacity(15.0);
        let log: Vec<(f64, f64, f64)> = station
            .load_log()
            .iter()
            .map(|p| (p.at, p.load_kw, p.capacity_kw))
            .collect();
        // At 600 s the load was 20 kW for no time at all: the log keeps what held after.
        assert_eq!(log, [(0.0, 11.0, 20.0), (600.0, 15.0, 15.0)]);
        let stats = station.stats();
        assert_eq!((stats.peak_load_kw, stats.overloads), (20.0, 0));
        assert_eq!(stats.peak_utilization, 1.0);
    }

    #[test]
    fn no_session_ends_before_the_earliest_end() {
        let mut station = Station::new(10.0, Allocation::Fcfs, 0.0);
        // Car 1 at full power: done at 1 h. Car 2 paused: at least 1 h from whenever it starts.
        station.arrive(0.0, car(1, 10.0, 10.0));
        station.arrive(0.0, car(2, 10.0, 10.0));
        assert_eq!(station.earliest_end(), Some(3600.0));
        station.advance_to(1800.0);
        assert_eq!(station.earliest_end(), Some(3600.0));
        let events = station.advance_to(3600.0);
        assert_eq!(
            kinds(&events),
            [(1, EventKind::Completed), (2, EventKind::Started)]
        );
        // Car 2 waited an hour: it cannot end before 2 h; a departure bounds it too.
        assert_eq!(station.earliest_end(), Some(7200.0));
        station.arrive(3600.0, car_leaving(3, 10.0, 10.0, 5000.0));
        assert_eq!(station.earliest_end(), Some(5000.0));
        assert_eq!(
            Station::new(10.0, Allocation::Llf, 0.0).earliest_end(),
            None
        );
    }

    #[test]
    fn triage_lets_the_cars_that_can_be_full_finish() {
        // 10 kW for 2 h: 20 kWh for three cars of 10 kW wanting 10 kWh each. Least laxity
        // rotates the power among all three, so none is full; triage writes one off and fills
        // the other two.
        let run = |policy| {
            let mut station = Station::new(10.0, policy, 0.0);
            let mut events = Vec::new();
            for n in 1..=3 {
                events.extend(station.arrive(0.0, car_leaving(n, 10.0, 10.0, 7200.0)));
            }
            events.extend(station.advance_to(7200.0));
            let full = events
                .iter()
                .filter(|e| e.kind == EventKind::Completed)
                .count();
            (full, station.snapshot().delivered_kwh)
        };
        let (full, delivered) = run(Allocation::Triage);
        assert_eq!(full, 2);
        assert!((delivered - 20.0).abs() < 1e-6, "{delivered}");
        let (full, delivered) = run(Allocation::Llf);
        assert_eq!(full, 0);
        assert!((delivered - 20.0).abs() < 1e-6, "{delivered}");
    }

    /// Runs `station` until `until` and returns the ids of the cars it filled.
    fn filled(station: &mut Station, mut events: Vec<Event>, until: f64) -> Vec<u128> {
        events.extend(station.advance_to(until));
        let mut full: Vec<u128> = events
            .iter()
            .filter(|e| e.kind == EventKind::Completed)
            .map(|e| e.id.as_u128())
            .collect();
        full.sort();
        full
    }

    #[test]
    fn triage_fills_rigid_cars_when_everyone_fits() {
        // 40 kW against 57.6 kW of cars. Cars 1 and 2 must draw their max from now to their
        // departure to be full (rigid, as a request cut to what fits arrives: 17.28 kWh at
        // 19.2 kW in 0.9 h, whose laxity rounds to -4.5e-13 s); car 3 can wait. Everything
        // fits, so triage fills all three, as least laxity would. It used to write off cars 1
        // and 2 for their rounding.
        let mut station = Station::new(40.0, Allocation::Triage, 0.0);
        let mut events = station.arrive(0.0, car_leaving(1, 19.2, 17.28, 0.9 * 3600.0));
        events.extend(station.arrive(0.0, car_leaving(2, 19.2, 32.64, 1.7 * 3600.0)));
        events.extend(station.arrive(0.0, car_leaving(3, 19.2, 30.0, 3.0 * 3600.0)));
        assert!(station.sessions()[..2].iter().all(|s| s.laxity(0.0) < 0.0));
        let drawn = powers(&station);
        assert!(drawn[..2].iter().all(|&p| p == 19.2), "{drawn:?}");
        assert_eq!(filled(&mut station, events, 3.0 * 3600.0), [1, 2, 3]);
    }

    #[test]
    fn triage_writes_off_a_rigid_car_that_would_push_another_out() {
        // 10 kW for 2 h is 20 kWh; cars 1 and 2 ask 30 together. Car 2 is rigid (20 kWh at
        // 10 kW in 2 h): admitting it would leave car 1 nothing. Car 1 is filled instead, and
        // car 2 gets what car 1 leaves.
        let mut station = Station::new(10.0, Allocation::Triage, 0.0);
        let mut events = station.arrive(0.0, car_leaving(1, 10.0, 10.0, 7200.0));
        events.extend(station.arrive(0.0, car_leaving(2, 10.0, 20.0, 7200.0)));
        assert_eq!(filled(&mut station, events, 7200.0), [1]);
        assert!((station.snapshot().delivered_kwh - 20.0).abs() < 1e-6);
    }

    #[test]
    fn triage_serves_a_written_off_car_while_the_others_can_wait() {
        // 10 kW. Car 1 leaves in 30 min wanting 10 kWh: it cannot be full, so it is written
        // off. Car 2 wants 10 kWh by 4 h: it can wait, so car 1 gets the power now and car 2
        // is still full at the end (delivered: 5 + 10 kWh, the most there is).
        let mut station = Station::new(10.0, Allocation::Triage, 0.0);
        station.arrive(0.0, car_leaving(1, 10.0, 10.0, 1800.0));
        station.arrive(0.0, car_leaving(2, 10.0, 10.0, 4.0 * 3600.0));
        assert_eq!(powers(&station), [10.0, 0.0]);
        let events = station.advance_to(4.0 * 3600.0);
        assert!(
            events
                .iter()
                .any(|e| e.id == Uuid::from_u128(2) && e.kind == EventKind::Completed),
            "{events:?}"
        );
        let delivered = station.snapshot().delivered_kwh;
        assert!((delivered - 15.0).abs() < 1e-6, "{delivered}");
    }

    #[test]
    fn every_allocation_keeps_its_limits_on_hostile_sessions() {
        let mut rng = StdRng::seed_from_u64(0x7472_6961_6765);
        let pick = |rng: &mut StdRng, values: &[f64]| values[rng.random_range(0..values.len())];
        for case in 0..3000 {
            let now = pick(&mut rng, &[0.0, 1e-9, 3600.0, 1e9]);
            let capacity = pick(&mut rng, &[-5.0, 0.0, 1e-12, 0.5, 7.0, 150.0, 1e12]);
            let sessions: Vec<Session> = (0..rng.random_range(0..30u128))
                .map(|n| {
                    let max = pick(&mut rng, &[1e-12, 0.1, 6.6, 6.6, 350.0, 1e9]);
                    let energy = pick(&mut rng, &[0.0, 1e-12, 1.0, 20.0, 200.0, 1e9]);
                    let delivered = energy * pick(&mut rng, &[0.0, 0.5, 1.0, 2.0]);
                    let departure = [
                        None,
                        Some(now),
                        Some(now - 10.0),
                        Some(now + 1e-9),
                        Some(now + 60.0),
                        Some(now + 7200.0),
                        Some(now + 1e12),
                        Some(f64::INFINITY),
                    ][rng.random_range(0..8)];
                    Session {
                        id: Uuid::from_u128(n),
                        max_power_kw: max,
                        energy_kwh: energy,
                        delivered_kwh: delivered,
                        arrival: now,
                        departure,
                        power_kw: 0.0,
                        started_at: None,
                        pinned_kw: None,
                        metered: false,
                        base_kwh: delivered,
                        since: now,
                    }
                })
                .collect();
            for policy in Allocation::ALL {
                let powers = allocate(policy, capacity, &sessions, now);
                let context = format!("case {case} {}: {powers:?}", policy.as_str());
                let load: f64 = powers.iter().sum();
                assert!(load <= capacity.max(0.0) * (1.0 + 1e-12), "{context}");
                let mut short = false;
                for (p, s) in powers.iter().zip(&sessions) {
                    assert!(p.is_finite() && *p >= 0.0, "{context}");
                    assert!(*p <= s.max_power_kw, "{context}");
                    short |= *p < s.max_power_kw - 1e-6 * s.max_power_kw.max(1.0);
                }
                // Work-conserving: someone short of its max only when the capacity is used.
                if short && policy != Allocation::Fcfs {
                    assert!(
                        load >= capacity.max(0.0) * (1.0 - 1e-9) - 1e-6,
                        "{context}: idle capacity"
                    );
                }
            }
        }
    }

    /// Checks the allocation invariants of the station as it is now: within capacity and every
    /// car's max power, work-conserving, and in the policy's order.
    fn assert_allocation_holds(station: &Station, context: &str) {
        let sessions = station.sessions();
        let now = station.now();
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
            if s.power_kw >= s.max_power_kw - 1e-9 {
                continue;
            }
            // Short of its max: only while the whole capacity is in use...
            assert!(
                load >= station.capacity_kw() - 1e-6,
                "{context}: car {i} is short while capacity is idle"
            );
            // ...and never while a car the policy ranks lower draws.
            let ranks_lower = |other: &Session, j: usize| match station.policy() {
                Allocation::Fcfs => j > i,
                Allocation::Edf => {
                    let (a, b) = (
                        s.departure.unwrap_or(f64::INFINITY),
                        other.departure.unwrap_or(f64::INFINITY),
                    );
                    b > a || (b == a && j > i)
                }
                // Laxities drift between re-allocations: checked where they were computed.
                Allocation::Llf if station.allocated_at() != now => false,
                Allocation::Llf => {
                    let (a, b) = (s.laxity(now), other.laxity(now));
                    b > a || (b == a && j > i)
                }
                // Water-filling: a car short of its max gets the highest level there is.
                Allocation::EqualShare => other.power_kw > s.power_kw + 1e-9,
                // Its order is checked by its own tests; here only the limits and work
                // conservation.
                Allocation::Triage => false,
            };
            for (j, other) in sessions.iter().enumerate() {
                if station.policy() == Allocation::EqualShare {
                    assert!(!ranks_lower(other, j), "{context}: car {j} above the level");
                } else if ranks_lower(other, j) {
                    assert_eq!(
                        other.power_kw, 0.0,
                        "{context}: car {j} draws before car {i} is served"
                    );
                }
            }
        }
    }

    /// Many random workloads (fixed seed) for every policy: arrivals at random times with random
    /// energy, max power and (mostly) departures, random capacity changes. At every instant the
    /// allocation holds; the energy delivered equals the integral of the load; every session
    /// ends exactly once, with all of its energy or at its departure.
    #[test]
    fn random_workloads_never_exceed_capacity_and_conserve_energy() {
        let mut rng = StdRng::seed_from_u64(0x6576_6772_6964);
        for workload in 0..400 {
            let policy = Allocation::ALL[workload % Allocation::ALL.len()];
            let capacity = rng.random_range(5.0..200.0);
            let mut station = Station::new(capacity, policy, 0.0);
            let mut arrivals: Vec<(f64, Arrival)> = (0..rng.random_range(1..40u128))
                .map(|n| {
                    let at = rng.random_range(0.0..4.0 * 3600.0);
                    let max_power = rng.random_range(1.0..350.0);
                    let energy = rng.random_range(0.5..120.0);
                    let departure = rng
                        .random_bool(0.8)
                        .then(|| at + rng.random_range(60.0..8.0 * 3600.0));
                    let car = Arrival {
                        departure,
                        ..car(n, max_power, energy)
                    };
                    (at, car)
                })
                .collect();
            arrivals.sort_by(|a, b| a.0.total_cmp(&b.0));
            let cars: std::collections::HashMap<Uuid, Arrival> =
                arrivals.iter().map(|(_, a)| (a.id, a.clone())).collect();
            let mut capacity_changes: Vec<(f64, f64)> = (0..rng.random_range(0..4))
                .map(|_| {
                    (
                        rng.random_range(0.0..6.0 * 3600.0),
                        rng.random_range(1.0..200.0),
                    )
                })
                .collect();
            capacity_changes.sort_by(|a, b| a.0.total_cmp(&b.0));

            let context = format!("workload {workload} ({})", policy.as_str());
            let mut integrated_kwh = 0.0;
            let mut ended_kwh = 0.0;
            let mut ended = std::collections::HashSet::new();
            let mut started = std::collections::HashSet::new();
            let (mut next_arrival, mut next_change) = (0, 0);
            let mut check = |events: Vec<Event>, station: &Station| {
                for e in events {
                    match e.kind {
                        EventKind::Started => assert!(started.insert(e.id), "started twice"),
                        EventKind::Completed | EventKind::Departed => {
                            assert!(ended.insert(e.id), "{context}: ended twice");
                            assert!(station.session(e.id).is_none());
                            let car = &cars[&e.id];
                            if e.kind == EventKind::Completed {
                                assert_eq!(e.delivered_kwh, car.energy_kwh);
                            } else {
                                assert_eq!(Some(e.at), car.departure, "{context}: left early");
                                assert!(e.delivered_kwh < car.energy_kwh);
                            }
                            ended_kwh += e.delivered_kwh;
                        }
                    }
                }
                assert_allocation_holds(station, &context);
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
            assert_eq!(ended.len(), cars.len(), "{context}");
            assert!(station.sessions().is_empty());
            assert_eq!(station.stats().overloads, 0, "{context}");
            let delivered = station.snapshot().delivered_kwh;
            assert!(
                (delivered - ended_kwh).abs() <= 1e-9 * ended_kwh.max(1.0),
                "{context}: delivered {delivered} vs sessions' {ended_kwh}"
            );
            assert!(
                (integrated_kwh - ended_kwh).abs() <= 1e-6 * ended_kwh.max(1.0),
                "{context}: integral of load {integrated_kwh} vs {ended_kwh}"
            );
            let requested: f64 = cars.values().map(|c| c.energy_kwh).sum();
            assert!(ended_kwh <= requested + 1e-9);
        }
    }
}
