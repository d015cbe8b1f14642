//! How a substation shares its capacity among the cars it charges: the [`Allocation`] policies,
//! each a pure function of the sessions and the time ([`allocate`]). The [`super::Station`]
//! model calls it on every arrival, completion, departure and capacity change.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use super::{POWER_EPSILON_KW, Session};
use crate::SECONDS_PER_HOUR;
use crate::units::Ordered;

/// How a substation shares its capacity among the cars it charges (`--allocation`).
///
/// Every policy obeys the same two limits: the sum never exceeds the capacity, and no car gets
/// more than its max power. Every policy is work-conserving: a car is held below its max power
/// only while the whole capacity is in use.
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Allocation {
    /// Water-filling: every car gets the same power, capped at its max; what a capped car
    /// leaves is shared among the others.
    EqualShare,
    /// Earliest departure first: cars in order of departure (cars without one last, then in
    /// arrival order) each get min(max power, capacity left).
    Edf,
    /// Least laxity first: like `edf`, ordered by laxity = time left − remaining energy ÷ max
    /// power (how long the car can still wait and be full at departure). The most energy, but
    /// it spreads a shortfall over many cars, so most leave just short of full.
    Llf,
    /// First come, first served: cars in arrival order each get min(max power, capacity left);
    /// a car offered nothing waits (queued) and starts when power frees up.
    Fcfs,
    /// Triage: decide which cars cannot all be full by their departures and let the others
    /// finish. The cars that can be full together are admitted in departure order, dropping the
    /// largest remaining energy whenever the capacity cannot deliver everything due by a
    /// departure (Moore–Hodgson on the whole capacity); rigid cars (those that must draw their
    /// max power until they leave) are admitted only while everyone admitted can still be
    /// full, per-car max powers included. The dropped ones, and those that cannot be full even
    /// alone, are written off. Admitted cars get the power they need to stay feasible (least
    /// laxity first), then written-off cars share what is left by departure, then admitted cars
    /// take the rest by least laxity. The default: within 0.5 % of the exact energy bound and
    /// more cars full than `edf` on the Caltech week; where everything fits, all of it, as
    /// `llf` (docs/dispatch.md).
    #[default]
    Triage,
}

impl Allocation {
    /// Every policy, for sweeps (`--allocation all` in the simulator).
    pub const ALL: [Allocation; 5] = [
        Allocation::EqualShare,
        Allocation::Edf,
        Allocation::Llf,
        Allocation::Fcfs,
        Allocation::Triage,
    ];

    /// The name used on the command line and in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::EqualShare => "equal-share",
            Self::Edf => "edf",
            Self::Llf => "llf",
            Self::Fcfs => "fcfs",
            Self::Triage => "triage",
        }
    }

    /// Whether the allocation can change between events with time alone (not only when a car
    /// arrives or leaves, or the capacity changes).
    pub fn depends_on_time(self) -> bool {
        matches!(self, Self::Llf | Self::Triage)
    }
}

/// How long `triage` plans ahead: the power a car must draw now to stay feasible is what it
/// must draw until the next re-allocation, at most this far away.
const TRIAGE_HORIZON_S: f64 = super::REALLOCATE_EVERY_S;

/// The share of the capacity `triage` lets admitted cars count on after the horizon; the rest
/// is kept for cars still to come, so admitted cars do not put their energy off until a new
/// arrival would have to be written off. Measured on the Caltech week (docs/dispatch.md),
/// energy of the exact bound and sessions full: 0.3 gives 99.71 % and 92.7 %, 0.33 99.83 % and
/// 91.1 %, 0.35 99.93 % and 89.4 %, 0.37 99.97 % and 87.9 %, 0.4 99.98 % and 86.1 %.
const TRIAGE_FUTURE_SHARE: f64 = 0.33;

/// A car whose laxity is within this of zero is rigid: it must draw its max power from now to
/// its departure to be full. (Requests cut to what fits at their car's max power arrive so, and
/// rounding puts their laxity a hair on either side of zero.)
const RIGID_LAXITY_S: f64 = 1.0;

/// Scratch space of [`allocate_into`]: no allocation once the buffers have grown to the number
/// of sessions.
#[derive(Debug, Clone, Default)]
pub(super) struct Scratch {
    keys: Vec<(f64, u32)>,
    rest: Vec<(f64, u32)>,
    laxity: Vec<f64>,
    admitted: Vec<bool>,
    largest: LazyHeap<(Ordered, u32)>,
    least: LazyHeap<Reverse<(Ordered, u32)>>,
    rank: Vec<u32>,
}

/// A max-heap that stays a plain list until its top is first asked for: in most allocations
/// `triage` only pushes (nobody is written off, no deficit), and heapifying n items at once
/// costs O(n) against O(n log n) for n pushes.
#[derive(Debug, Clone)]
pub(super) struct LazyHeap<T: Ord> {
    heap: BinaryHeap<T>,
    pending: Vec<T>,
}

impl<T: Ord> Default for LazyHeap<T> {
    fn default() -> Self {
        Self {
            heap: BinaryHeap::new(),
            pending: Vec::new(),
        }
    }
}

impl<T: Ord> LazyHeap<T> {
    fn clear(&mut self) {
        self.heap.clear();
        self.pending.clear();
    }

    fn push(&mut self, item: T) {
        if self.heap.is_empty() {
            self.pending.push(item);
        } else {
            self.heap.push(item);
        }
    }

    fn settle(&mut self) -> &mut BinaryHeap<T> {
        if !self.pending.is_empty() {
            // Extending rebuilds the heap in O(n) when it adds this much.
            self.heap.extend(self.pending.drain(..));
        }
        &mut self.heap
    }

    fn pop(&mut self) -> Option<T> {
        self.settle().pop()
    }

    fn peek(&mut self) -> Option<&T> {
        self.settle().peek()
    }
}

/// Shares `capacity_kw` among `sessions` (in arrival order) at simulated time `now` by
/// `policy`: the power of each session, in the same order. Never above the capacity in sum, nor
/// above any car's max power.
pub fn allocate(policy: Allocation, capacity_kw: f64, sessions: &[Session], now: f64) -> Vec<f64> {
    let mut powers = vec![0.0; sessions.len()];
    allocate_into(
        policy,
        capacity_kw,
        sessions,
        now,
        &mut Scratch::default(),
        &mut powers,
    );
    powers
}

/// [`allocate`] into `powers` (one per session).
pub(super) fn allocate_into(
    policy: Allocation,
    capacity_kw: f64,
    sessions: &[Session],
    now: f64,
    scratch: &mut Scratch,
    powers: &mut [f64],
) {
    let capacity_kw = capacity_kw.max(0.0);
    if policy == Allocation::Triage {
        triage(capacity_kw, sessions, now, scratch, powers);
        return;
    }
    let keys = &mut scratch.keys;
    let key = |s: &Session| -> f64 {
        match policy {
            Allocation::EqualShare => s.max_power_kw,
            Allocation::Edf => s.departure.unwrap_or(f64::INFINITY),
            Allocation::Llf | Allocation::Triage => s.laxity(now),
            Allocation::Fcfs => 0.0,
        }
    };
    keys.clear();
    keys.extend(sessions.iter().enumerate().map(|(i, s)| (key(s), i as u32)));
    if policy != Allocation::Fcfs {
        // Ties in arrival order: a total order, so the result never depends on the sort.
        keys.sort_unstable_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    }
    let mut left = capacity_kw;
    let n = keys.len();
    for (k, &(_, i)) in keys.iter().enumerate() {
        let s = &sessions[i as usize];
        let offer = match policy {
            // Ascending max power: each car takes its max or an equal share of what is left,
            // whichever is less, so a capped car's remainder goes to the others.
            Allocation::EqualShare => left / (n - k) as f64,
            Allocation::Edf | Allocation::Llf | Allocation::Fcfs | Allocation::Triage => left,
        };
        let power = s.max_power_kw.min(offer);
        if power < POWER_EPSILON_KW {
            powers[i as usize] = 0.0;
            continue;
        }
        powers[i as usize] = power;
        left = (left - power).max(0.0);
    }
}

/// [`Allocation::Triage`].
fn triage(
    capacity_kw: f64,
    sessions: &[Session],
    now: f64,
    scratch: &mut Scratch,
    powers: &mut [f64],
) {
    powers.fill(0.0);
    // Room for every car at its max (most of the time outside peaks): nothing to decide.
    if sessions.iter().map(|s| s.max_power_kw).sum::<f64>() <= capacity_kw {
        for (p, s) in powers.iter_mut().zip(sessions) {
            *p = if s.max_power_kw >= POWER_EPSILON_KW {
                s.max_power_kw
            } else {
                0.0
            };
        }
        return;
    }
    let Scratch {
        keys: by_departure,
        rest: by_laxity,
        laxity,
        admitted,
        largest,
        least,
        rank,
    } = scratch;
    // Two orders serve every pass: the cars with a departure by departure, and those that can
    // be full alone (give or take a rigid car's rounding) by laxity.
    laxity.clear();
    laxity.extend(sessions.iter().map(|s| s.laxity(now)));
    let can_be_full = |i: u32| laxity[i as usize] >= -RIGID_LAXITY_S;
    let is_rigid = |i: u32| laxity[i as usize] < RIGID_LAXITY_S;
    by_departure.clear();
    by_departure.extend(
        sessions
            .iter()
            .enumerate()
            .filter_map(|(i, s)| Some((s.departure?, i as u32))),
    );
    by_departure.sort_unstable_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    by_laxity.clear();
    by_laxity.extend(
        by_departure
            .iter()
            .filter(|&&(_, i)| can_be_full(i))
            .map(|&(_, i)| (laxity[i as usize], i)),
    );
    by_laxity.sort_unstable_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));

    // Admission, in departure order: cars that can be full alone with time to spare, while
    // everything due by each departure fits in the capacity until then; when it does not, the
    // largest remaining energy admitted so far is written off (Moore–Hodgson: it frees the most
    // for the others, so the most cars stay admitted). Cars without a departure are never due:
    // admitted. Rigid cars, which must draw their max power from now to their departure to be
    // full, come after (below).
    admitted.clear();
    admitted.extend(sessions.iter().map(|s| s.departure.is_none()));
    largest.clear();
    let (mut due_kwh, mut any_rigid) = (0.0, false);
    for &(d, i) in by_departure.iter().filter(|&&(_, i)| can_be_full(i)) {
        if is_rigid(i) {
            any_rigid = true;
            continue;
        }
        let r = sessions[i as usize].remaining_kwh();
        due_kwh += r;
        largest.push((Ordered(r), i));
        admitted[i as usize] = true;
        let room_kwh = capacity_kw * (d - now) / SECONDS_PER_HOUR;
        while due_kwh > room_kwh {
            let Some((Ordered(r), j)) = largest.pop() else {
                break;
            };
            due_kwh -= r;
            admitted[j as usize] = false;
        }
    }
    // A rigid car costs its max power until it leaves, whatever else arrives: admitted, in
    // departure order, only while every admitted car can still be full (exactly, per-car max
    // powers included). On a burst where everything fits, all are; under overload, none that
    // would push another admitted car out. (Admitting them by the energy test alone filled
    // 69.9 % of the Caltech week's cars; writing them all off lost 11 points of a burst.)
    if any_rigid {
        // Rigid cars by departure: rank[i] (u32::MAX for the others).
        rank.clear();
        rank.resize(sessions.len(), u32::MAX);
        let mut count = 0;
        for &(_, i) in by_departure.iter() {
            if can_be_full(i) && is_rigid(i) {
                rank[i as usize] = count;
                count += 1;
            }
        }
        let fits = |k: u32| {
            all_can_be_full(capacity_kw, sessions, now, by_departure, by_laxity, |i| {
                admitted[i as usize] || rank[i as usize] < k
            })
        };
        // The most rigid cars, earliest departures first, that keep everyone able to be full:
        // nearly always all of them (on the Caltech week, 99.8 % of the rigid cars considered
        // fit), which one check tells; else found by bisection. (Taking each one that fits,
        // skipping those that do not, gave the same results on every workload of
        // docs/dispatch.md, for 18 % more instructions.)
        let (mut lo, mut hi) = (0, count);
        if !fits(hi) {
            hi -= 1;
            while lo < hi {
                let mid = (lo + hi).div_ceil(2);
                if fits(mid) {
                    lo = mid;
                } else {
                    hi = mid - 1;
                }
            }
        }
        for (i, &r) in rank.iter().enumerate() {
            if r < hi {
                admitted[i] = true;
            }
        }
    }

    // Pass 1, admitted cars: what each must draw before the next re-allocation to stay
    // feasible alone (least laxity first), then, departure by departure, what the cars due by
    // then must draw together so that what is due fits in the share of the capacity they count
    // on after that; taken from the least laxity among them first. (From the earliest
    // departures first, a car that needs its full power to the end was starved: on a burst
    // where `llf` fills every car, triage filled 95 %.)
    let mut left = capacity_kw;
    let horizon_h = TRIAGE_HORIZON_S / SECONDS_PER_HOUR;
    let after_h = |d: f64| ((d - now) / SECONDS_PER_HOUR - horizon_h).max(0.0);
    for &(_, i) in by_laxity.iter().filter(|&&(_, i)| admitted[i as usize]) {
        let s = &sessions[i as usize];
        let d = s.departure.unwrap_or(f64::INFINITY);
        let own = (s.remaining_kwh() - s.max_power_kw * after_h(d)).max(0.0) / horizon_h;
        let power = own.min(s.max_power_kw).min(left);
        if power >= POWER_EPSILON_KW {
            powers[i as usize] = power;
            left -= power;
        }
    }
    let (mut due_kwh, mut prefix_kw) = (0.0, 0.0);
    least.clear();
    for &(d, i) in by_departure.iter().filter(|&&(_, i)| admitted[i as usize]) {
        let s = &sessions[i as usize];
        due_kwh += s.remaining_kwh();
        prefix_kw += powers[i as usize];
        if powers[i as usize] < s.max_power_kw {
            least.push(Reverse((Ordered(laxity[i as usize]), i)));
        }
        let mut deficit = (due_kwh - TRIAGE_FUTURE_SHARE * capacity_kw * after_h(d)).max(0.0)
            / horizon_h
            - prefix_kw;
        while deficit >= POWER_EPSILON_KW && left >= POWER_EPSILON_KW {
            let Some(&Reverse((_, j))) = least.peek() else {
                break;
            };
            let j = j as usize;
            let extra = (sessions[j].max_power_kw - powers[j])
                .min(deficit)
                .min(left);
            if extra > 0.0 {
                powers[j] += extra;
                left -= extra;
                prefix_kw += extra;
                deficit -= extra;
            }
            if powers[j] >= sessions[j].max_power_kw || extra <= 0.0 {
                least.pop();
            }
        }
    }
    // Pass 2: the written-off cars by departure (what they get now they cannot get later),
    // then pass 3: the admitted cars by least laxity, then those without a departure, each up
    // to its max.
    let written_off = by_departure.iter().filter(|&&(_, i)| !admitted[i as usize]);
    let by_laxity_admitted = by_laxity.iter().filter(|&&(_, i)| admitted[i as usize]);
    let no_departure = sessions
        .iter()
        .enumerate()
        .filter(|(_, s)| s.departure.is_none())
        .map(|(i, _)| i as u32);
    let order = written_off
        .chain(by_laxity_admitted)
        .map(|&(_, i)| i)
        .chain(no_departure);
    for i in order {
        if left < POWER_EPSILON_KW {
            return;
        }
        let s = &sessions[i as usize];
        let extra = (s.max_power_kw - powers[i as usize]).min(left);
        if extra >= POWER_EPSILON_KW {
            powers[i as usize] += extra;
            left -= extra;
        }
    }
}

/// Whether every car `include`d can be full by its departure, with the whole capacity from now
/// on and nobody else arriving. Exact: a car must have drawn by time t at least what its max
/// power cannot deliver between t and its departure, and those must-haves fit under capacity ×
/// elapsed time at every t if and only if a schedule exists (the max-flow cut over time slots;
/// with every car present from now on, the tightest cuts are the prefixes). The sum is
/// piecewise linear, so its breakpoints are the times to check: each car's last start at its
/// max power (now + its laxity) and its departure, which the cars `by_departure` and
/// `by_laxity` give sorted.
fn all_can_be_full(
    capacity_kw: f64,
    sessions: &[Session],
    now: f64,
    by_departure: &[(f64, u32)],
    by_laxity: &[(f64, u32)],
    include: impl Fn(u32) -> bool,
) -> bool {
    let rate = |i: u32| sessions[i as usize].max_power_kw / SECONDS_PER_HOUR;
    let mut starts = by_laxity
        .iter()
        .filter(|&&(_, i)| include(i))
        .map(|&(laxity, i)| ((now + laxity).max(now), rate(i)))
        .peekable();
    let mut ends = by_departure
        .iter()
        .filter(|&&(_, i)| include(i))
        .map(|&(d, i)| (d, -rate(i)))
        .peekable();
    let capacity_kwh_per_s = capacity_kw / SECONDS_PER_HOUR;
    let (mut must_kwh, mut slope, mut at) = (0.0, 0.0, now);
    loop {
        let (t, delta) = match (starts.peek(), ends.peek()) {
            (Some(start), Some(end)) if start.0 <= end.0 => starts.next(),
            (_, Some(_)) => ends.next(),
            (Some(_), None) => starts.next(),
            (None, None) => return true,
        }
        .expect("peeked");
        must_kwh += slope * (t - at);
        // kWh of rounding tolerated.
        if must_kwh > capacity_kwh_per_s * (t - now) + 1e-6 {
            return false;
        }
        slope += delta;
        at = t;
    }
}
