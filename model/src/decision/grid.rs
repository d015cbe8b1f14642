//! The dispatcher's view of the grid ([`GridView`]): the newest heartbeat of every substation
//! plus the assignments sent to it since, and what [`super::decide`] reads from them (load,
//! headroom, and the predictive outlook of energy owed by each departure horizon). Plain data,
//! updated by the dispatcher as heartbeats arrive and assignments go out.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::{Demand, HORIZONS};
use crate::SECONDS_PER_HOUR;
use crate::liveness::{Hearing, Observed, stale_after};
use crate::messages::{PROJECTION_HORIZONS_S, Projection};

/// An assignment sent to a substation whose effect is not in its heartbeats yet.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Pending {
    pub(crate) ticket: u64,
    /// `EV_DISPATCH` sequence, once the PubAck told it.
    pub(crate) seq: Option<u64>,
    pub(crate) power_kw: f64,
    pub(crate) energy_kwh: f64,
    /// µs since the epoch.
    pub(crate) departure_us: Option<i64>,
}

/// The numbers a decision reads for one substation, packed apart from everything else so a scan
/// over thousands of substations stays in cache.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Load {
    /// Up while the time (µs since the epoch) is at most this: stored_at + [`stale_after`].
    pub(crate) up_until_us: i64,
    pub(crate) capacity_kw: f64,
    /// The larger of the reported load and the reported demand (a saturated substation's demand
    /// is above its capacity).
    pub(crate) reported_kw: f64,
    /// Power of the pending assignments.
    pub(crate) pending_kw: f64,
}

impl Load {
    pub(crate) fn of(observed: &Observed, pending_kw: f64) -> Self {
        let hb = &observed.heartbeat;
        let stale_after_us =
            i64::try_from(stale_after(Duration::from_millis(hb.interval_ms)).as_micros())
                .unwrap_or(i64::MAX);
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

    pub(crate) fn is_up(&self, now_us: i64) -> bool {
        now_us <= self.up_until_us
    }

    pub(crate) fn headroom_kw(&self) -> f64 {
        self.capacity_kw - (self.reported_kw + self.pending_kw)
    }

    /// Reported + pending, over capacity.
    pub(crate) fn estimated_utilization(&self) -> f64 {
        utilization(self.reported_kw + self.pending_kw, self.capacity_kw)
    }

    /// Reported only (what the last heartbeat said), over capacity.
    pub(crate) fn reported_utilization(&self) -> f64 {
        utilization(self.reported_kw, self.capacity_kw)
    }
}

pub(crate) fn utilization(load_kw: f64, capacity_kw: f64) -> f64 {
    if capacity_kw > 0.0 {
        load_kw / capacity_kw
    } else {
        f64::INFINITY
    }
}

/// What a substation's sessions and the assignments sent since its heartbeat still need, by
/// departure: the heartbeat's [`Projection`] on the fixed horizons plus the pending energy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Owed {
    /// When the heartbeat was stored (µs since the epoch): horizons count from here.
    pub(crate) base_us: i64,
    /// Energy due by each of [`PROJECTION_HORIZONS_S`] after `base_us` (cumulative), kWh.
    pub(crate) due_kwh: [f64; HORIZONS],
    /// All energy still to deliver, kWh.
    pub(crate) remaining_kwh: f64,
}

impl Owed {
    pub(crate) fn of(observed: &Observed, projection: Option<&Projection>) -> Self {
        let mut due_kwh = [0.0; HORIZONS];
        let mut remaining_kwh = 0.0;
        if let Some(p) = projection {
            // Resampled onto our horizons, should a substation send others: each takes the
            // energy due by the latest of its horizons within ours.
            for (due, &horizon) in due_kwh.iter_mut().zip(&PROJECTION_HORIZONS_S) {
                *due = p
                    .horizons_s
                    .iter()
                    .zip(&p.due_kwh)
                    .take_while(|(h, _)| **h <= horizon)
                    .last()
                    .map_or(0.0, |(_, kwh)| kwh.max(0.0));
            }
            remaining_kwh = p.remaining_kwh.max(0.0);
        }
        Self {
            base_us: observed.stored_at.timestamp_micros(),
            due_kwh,
            remaining_kwh,
        }
    }

    /// Adds (or with `sign` −1, takes out) a pending assignment.
    pub(crate) fn add(&mut self, p: &Pending, sign: f64) {
        let kwh = sign * p.energy_kwh;
        self.remaining_kwh += kwh;
        if let Some(k) = p.departure_us.and_then(|d| self.bucket(d)) {
            for due in &mut self.due_kwh[k..] {
                *due += kwh;
            }
        }
    }

    /// The first horizon a departure at `departure_us` falls within, if any.
    pub(crate) fn bucket(&self, departure_us: i64) -> Option<usize> {
        let after_s = (departure_us - self.base_us) as f64 / 1e6;
        PROJECTION_HORIZONS_S.iter().position(|&h| after_s <= h)
    }
}

/// What the predictive policy reads per substation, derived from its [`Owed`] and capacity
/// whenever either changes, so a decision costs a few operations per substation. Kept apart
/// from [`Load`]: other policies never touch it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Outlook {
    pub(crate) base_us: i64,
    /// `spare_from_h[k]`: the least, over horizons k and later, of the horizon (hours after
    /// `base_us`) minus the hours the capacity needs for the energy due by it.
    pub(crate) spare_from_h: [f64; HORIZONS],
    /// Hours the capacity needs for all the energy still to deliver.
    pub(crate) everything_h: f64,
}

impl Outlook {
    pub(crate) fn of(owed: &Owed, capacity_kw: f64) -> Self {
        let mut spare_from_h = [f64::NEG_INFINITY; HORIZONS];
        let mut everything_h = f64::INFINITY;
        if capacity_kw > 0.0 {
            let mut least = f64::INFINITY;
            for k in (0..HORIZONS).rev() {
                let spare =
                    PROJECTION_HORIZONS_S[k] / SECONDS_PER_HOUR - owed.due_kwh[k] / capacity_kw;
                least = least.min(spare);
                spare_from_h[k] = least;
            }
            everything_h = owed.remaining_kwh / capacity_kw;
        }
        Self {
            base_us: owed.base_us,
            spare_from_h,
            everything_h,
        }
    }

    /// Spare time (hours) the substation has, at `now_us`, for a car leaving at `departure_us`
    /// (or never, `None`): the least, over the car's departure and every later horizon, of the
    /// time left minus the time the capacity needs for all the energy due by then. Without a
    /// departure: minus the time to deliver everything. Higher is better; negative means
    /// something will leave short.
    ///
    /// The car's own energy is left out: it is the same wherever the car goes, and counting it
    /// would send big cars to big substations and small ones to the rest, skewing how many cars
    /// each gets (the herd factor) for no energy gained (`evgrid sim`, docs/dispatch.md).
    pub(crate) fn spare_hours(&self, departure_us: Option<i64>, now_us: i64) -> f64 {
        let Some(departure_us) = departure_us else {
            return -self.everything_h;
        };
        const HOURS_PER_US: f64 = 1.0 / 3.6e9;
        const SECONDS_PER_US: f64 = 1e-6;
        let elapsed_h = ((now_us - self.base_us) as f64 * HOURS_PER_US).max(0.0);
        let after_s = (departure_us - self.base_us) as f64 * SECONDS_PER_US;
        // The first horizon at or after the departure (a branch-free count: this runs once per
        // substation per decision).
        let k = PROJECTION_HORIZONS_S
            .iter()
            .map(|&h| usize::from(h < after_s))
            .sum::<usize>();
        let mut spare = self
            .spare_from_h
            .get(k)
            .map_or(f64::INFINITY, |s| s - elapsed_h);
        if k == HORIZONS {
            // Beyond the last horizon: only the total owed binds.
            spare = spare.min(after_s / SECONDS_PER_HOUR - elapsed_h - self.everything_h);
        }
        spare
    }
}

/// What the grid keeps per substation besides its [`Load`] and [`Outlook`].
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub(crate) id: Arc<str>,
    pub(crate) observed: Observed,
    pub(crate) projection: Option<Projection>,
    /// In ticket order (the order of decisions).
    pub(crate) pending: Vec<Pending>,
    /// The projection plus the pending assignments.
    pub(crate) owed: Owed,
}

impl Entry {
    pub(crate) fn pending_index(&self, ticket: u64) -> Option<usize> {
        self.pending
            .binary_search_by_key(&ticket, |p| p.ticket)
            .ok()
    }

    /// The owed energy summed afresh (no rounding drift survives a heartbeat).
    pub(crate) fn owed_afresh(&self) -> Owed {
        let mut owed = Owed::of(&self.observed, self.projection.as_ref());
        for p in &self.pending {
            owed.add(p, 1.0);
        }
        owed
    }
}

/// One substation as the dispatcher sees it: its newest heartbeat and what was sent to it
/// since. A view into a [`GridView`].
#[derive(Debug, Clone, Copy)]
pub struct SubstationView<'a> {
    pub(crate) entry: &'a Entry,
    pub(crate) load: &'a Load,
}

impl<'a> SubstationView<'a> {
    pub fn id(&self) -> &'a str {
        &self.entry.id
    }

    /// The newest heartbeat and when the server stored it.
    pub fn observed(&self) -> &'a Observed {
        &self.entry.observed
    }

    /// The projection the newest heartbeat carried, if any.
    pub fn projection(&self) -> Option<&'a Projection> {
        self.entry.projection.as_ref()
    }

    /// Up = heard from within [`stale_after`] its interval of when its last heartbeat was stored
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
/// still awaiting its PubAck). [`GridView::confirm`] or [`GridView::cancel`] settles it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ticket {
    pub(crate) substation_id: Arc<str>,
    pub(crate) id: u64,
}

impl Ticket {
    pub fn substation_id(&self) -> &str {
        &self.substation_id
    }
}

/// The dispatcher's view of the grid: every substation ever heard from, sorted by id (so a scan
/// meets ties in id order), with its newest heartbeat and pending assignments.
#[derive(Debug, Clone, Default)]
pub struct GridView {
    /// Parallel to `loads` and `outlooks`: same substations, same order.
    pub(crate) entries: Vec<Entry>,
    pub(crate) loads: Vec<Load>,
    pub(crate) outlooks: Vec<Outlook>,
    pub(crate) next_ticket: u64,
    /// Where round-robin looks first: the position after the last assignment.
    pub(crate) round_robin_next: usize,
    pub(crate) hearing: Hearing,
    /// The most substations tracked at once ([`GridView::with_max_substations`]); `None`:
    /// unbounded (the simulator, whose grid is its own).
    pub(crate) max_substations: Option<usize>,
}

impl GridView {
    pub fn new() -> Self {
        Self::default()
    }

    /// Tracks at most `max` substations: while that many are known, a heartbeat of an unknown
    /// one is refused ([`GridView::observe_with`] returns false and it stays unknown), so
    /// heartbeats of made-up substations cannot grow the view without bound.
    pub fn with_max_substations(mut self, max: usize) -> Self {
        self.max_substations = Some(max);
        self
    }

    /// Forgets every substation silent for longer than `after` at `now`, silence counted only
    /// while the grid was heard ([`Hearing`]: an outage of NATS forgets nobody), that is not up
    /// (a substation announcing a long interval is kept through it) and holds no pending
    /// assignment. Returns their ids. A forgotten substation that heartbeats again is
    /// taken in as new.
    pub fn forget_silent(&mut self, now: DateTime<Utc>, after: Duration) -> Vec<Arc<str>> {
        let after_s = after.as_secs_f64();
        let now_us = now.timestamp_micros();
        let forget: Vec<bool> = self
            .entries
            .iter()
            .zip(&self.loads)
            .map(|(e, load)| {
                e.pending.is_empty()
                    && !load.is_up(now_us)
                    && self.hearing.silence_seconds(&e.observed, now) > after_s
            })
            .collect();
        if !forget.contains(&true) {
            return Vec::new();
        }
        let before_round_robin = forget[..self.round_robin_next.min(forget.len())]
            .iter()
            .filter(|f| **f)
            .count();
        self.round_robin_next -= before_round_robin;
        let mut flags = forget.iter();
        self.loads.retain(|_| !flags.next().expect("parallel"));
        let mut flags = forget.iter();
        self.outlooks.retain(|_| !flags.next().expect("parallel"));
        let mut forgotten = Vec::new();
        let mut flags = forget.iter();
        self.entries.retain(|e| {
            let gone = *flags.next().expect("parallel");
            if gone {
                forgotten.push(e.id.clone());
            }
            !gone
        });
        forgotten
    }

    /// Every known substation (up or not), sorted by id.
    pub fn substations(&self) -> impl ExactSizeIterator<Item = SubstationView<'_>> + '_ {
        self.entries
            .iter()
            .zip(&self.loads)
            .map(|(entry, load)| SubstationView { entry, load })
    }

    /// How long the grid's heartbeats have been heard: what a substation's silence is judged
    /// over (failover).
    pub fn hearing(&self) -> &Hearing {
        &self.hearing
    }

    pub fn get(&self, substation_id: &str) -> Option<SubstationView<'_>> {
        let i = self.position(substation_id).ok()?;
        Some(SubstationView {
            entry: &self.entries[i],
            load: &self.loads[i],
        })
    }

    /// How many substations are up at `now`.
    pub fn up_count(&self, now: DateTime<Utc>) -> usize {
        let now_us = now.timestamp_micros();
        self.loads.iter().filter(|l| l.is_up(now_us)).count()
    }

    pub(crate) fn position(&self, substation_id: &str) -> Result<usize, usize> {
        self.entries
            .binary_search_by(|e| (*e.id).cmp(substation_id))
    }

    /// Takes in a heartbeat without a projection (a substation that sends none is seen as
    /// carrying only what was sent to it since). See [`GridView::observe_with`].
    pub fn observe(&mut self, observed: Observed) -> bool {
        self.observe_with(observed, None)
    }

    /// Takes in a heartbeat and the projection it carried. Returns false (and changes nothing)
    /// when it is older than the one already held for that substation (a replay after a
    /// reconnect must not roll the view back), or when it is of a new substation and the view
    /// already tracks its maximum ([`GridView::with_max_substations`]).
    ///
    /// The pending assignments the heartbeat echoes (`EV_DISPATCH` sequence ≤ its `dispatch_seq`)
    /// are dropped: they are in its load and projection now.
    pub fn observe_with(&mut self, observed: Observed, projection: Option<Projection>) -> bool {
        self.hearing.heard(&observed);
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
                entry.projection = projection;
                entry.owed = entry.owed_afresh();
                self.outlooks[i] = Outlook::of(&entry.owed, self.loads[i].capacity_kw);
            }
            Err(_)
                if self
                    .max_substations
                    .is_some_and(|max| self.entries.len() >= max) =>
            {
                return false;
            }
            Err(i) => {
                let owed = Owed::of(&observed, projection.as_ref());
                let entry = Entry {
                    id: Arc::from(observed.heartbeat.substation_id.as_str()),
                    observed,
                    projection,
                    pending: Vec::new(),
                    owed,
                };
                let load = Load::of(&entry.observed, 0.0);
                self.outlooks
                    .insert(i, Outlook::of(&owed, load.capacity_kw));
                self.loads.insert(i, load);
                self.entries.insert(i, entry);
                if self.round_robin_next > i {
                    self.round_robin_next += 1;
                }
            }
        }
        true
    }

    /// Records an assignment of `demand` (counted as `power_kw`) to a substation at decision
    /// time, before its `EV_DISPATCH` sequence is known, so the next decision already counts
    /// it. `None` when the substation is unknown.
    pub fn assign(
        &mut self,
        substation_id: &str,
        power_kw: f64,
        demand: &Demand,
    ) -> Option<Ticket> {
        let i = self.position(substation_id).ok()?;
        self.next_ticket += 1;
        let pending = Pending {
            ticket: self.next_ticket,
            seq: None,
            power_kw,
            energy_kwh: demand.energy_kwh,
            departure_us: demand.departure.map(|d| d.timestamp_micros()),
        };
        let entry = &mut self.entries[i];
        entry.pending.push(pending);
        entry.owed.add(&pending, 1.0);
        self.loads[i].pending_kw += power_kw;
        self.outlooks[i] = Outlook::of(&entry.owed, self.loads[i].capacity_kw);
        self.round_robin_next = i + 1;
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

    pub(crate) fn remove_pending(&mut self, i: usize, k: usize) {
        let entry = &mut self.entries[i];
        let removed = entry.pending.remove(k);
        let load = &mut self.loads[i];
        if entry.pending.is_empty() {
            load.pending_kw = 0.0;
            entry.owed = entry.owed_afresh();
        } else {
            load.pending_kw -= removed.power_kw;
            entry.owed.add(&removed, -1.0);
        }
        self.outlooks[i] = Outlook::of(&entry.owed, load.capacity_kw);
    }

    /// Records an assignment whose `EV_DISPATCH` sequence is already known (a simulator, or a
    /// caller that publishes before recording). False when the substation is unknown.
    pub fn record_assignment(
        &mut self,
        substation_id: &str,
        seq: u64,
        power_kw: f64,
        demand: &Demand,
    ) -> bool {
        match self.assign(substation_id, power_kw, demand) {
            Some(ticket) => {
                self.confirm(&ticket, seq);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + s, 0).unwrap()
    }

    fn beat(id: &str, stored_s: i64) -> Observed {
        let mut observed = crate::liveness::tests::observed(1000, at(stored_s));
        observed.heartbeat.substation_id = id.into();
        observed
    }

    fn ids(g: &GridView) -> Vec<&str> {
        g.substations().map(|s| s.id()).collect()
    }

    #[test]
    fn a_full_view_refuses_new_substations_but_keeps_the_known_ones() {
        let mut g = GridView::new().with_max_substations(2);
        assert!(g.observe(beat("a", 0)));
        assert!(g.observe(beat("b", 0)));
        assert!(!g.observe(beat("c", 0)), "full: a new one is refused");
        assert!(g.observe(beat("a", 1)), "a known one is still heard");
        assert_eq!(ids(&g), ["a", "b"]);
    }

    #[test]
    fn the_long_silent_are_forgotten_unless_something_is_pending() {
        let mut g = GridView::new();
        // Everyone heard at 0; from then on only "c" heartbeats (the grid is heard).
        for id in ["a", "b", "c", "d"] {
            g.observe(beat(id, 0));
        }
        for t in 1..=700 {
            g.observe(beat("c", t));
        }
        let demand = Demand {
            energy_kwh: 10.0,
            max_power_kw: 11.0,
            departure: None,
        };
        g.assign("b", 11.0, &demand).expect("known");
        // Round robin looks after "b" next.
        assert_eq!(g.round_robin_next, 2);
        let forgotten = g.forget_silent(at(700), Duration::from_secs(600));
        assert_eq!(
            forgotten.iter().map(|id| &**id).collect::<Vec<_>>(),
            ["a", "d"]
        );
        assert_eq!(ids(&g), ["b", "c"]);
        assert_eq!(g.round_robin_next, 1, "still right after b");
        assert_eq!(g.loads.len(), 2);
        assert_eq!(g.outlooks.len(), 2);
        assert!(
            g.forget_silent(at(700), Duration::from_secs(600))
                .is_empty()
        );
        // Heard again: known again.
        assert!(g.observe(beat("a", 701)));
        assert_eq!(ids(&g), ["a", "b", "c"]);
    }
}
