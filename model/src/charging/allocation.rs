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
    /// departure (Moore–Hodgson on the whole capacity); the dropped ones, and those that cannot
    /// be full even alone, are written off. Admitted cars get the power they need to stay
    /// feasible (least laxity first), then written-off cars share what is left by departure,
    /// then admitted cars take the rest by least laxity. The default: within 0.5 % of `llf`'s
    /// energy, and nearly as many cars full as `edf` (docs/dispatch.md).
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
/// arrival would have to be written off. Measured on the Caltech week (docs/dispatch.md): 1
/// (charge as late as possible) serves 74 % of the sessions in full, 0.5 serves 88 % at
/// 99.9 % of the pooled energy, 0.45 serves 91 % at 99.7 %, 0.4 serves 91 % at 99.35 %, 0
/// (as early as possible) 94 % at 94 %.
const TRIAGE_FUTURE_SHARE: f64 = 0.45;

/// Scratch space of [`allocate_into`]: no allocation once the buffers have grown to the number
/// of sessions.
#[derive(Debug, Clone, Default)]
pub(super) struct Scratch {
    keys: Vec<(f64, u32)>,
    rest: Vec<(f64, u32)>,
    admitted: Vec<bool>,
    largest: BinaryHeap<(Ordered, u32)>,
    least: BinaryHeap<Reverse<(Ordered, u32)>>,
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
        keys,
        rest,
        admitted,
        largest,
        least,
    } = scratch;
    // Admission, in departure order: cars that can be full alone, while everything due by each
    // departure fits in the capacity until then; when it does not, the largest remaining energy
    // admitted so far is written off (Moore–Hodgson: it frees the most for the others, so the
    // most cars stay admitted). Cars without a departure are never due: admitted.
    keys.clear();
    keys.extend(sessions.iter().enumerate().filter_map(|(i, s)| {
        let d = s.departure?;
        (s.laxity(now) >= 0.0).then_some((d, i as u32))
    }));
    keys.sort_unstable_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    admitted.clear();
    admitted.extend(sessions.iter().map(|s| s.departure.is_none()));
    largest.clear();
    let mut due_kwh = 0.0;
    for &(d, i) in keys.iter() {
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
    keys.retain(|&(_, i)| admitted[i as usize]);

    // Pass 1, admitted cars: what each must draw before the next re-allocation to stay
    // feasible alone (least laxity first), then, departure by departure, what the cars due by
    // then must draw together so that what is due fits in the share of the capacity they count
    // on after that; taken from the least laxity among them first. (From the earliest
    // departures first, a car that needs its full power to the end was starved: on a burst
    // where `llf` fills every car, triage filled 95 %.)
    let mut left = capacity_kw;
    let horizon_h = TRIAGE_HORIZON_S / SECONDS_PER_HOUR;
    let after_h = |d: f64| ((d - now) / SECONDS_PER_HOUR - horizon_h).max(0.0);
    rest.clear();
    rest.extend(
        keys.iter()
            .map(|&(_, i)| (sessions[i as usize].laxity(now), i)),
    );
    rest.sort_unstable_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    for &(_, i) in rest.iter() {
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
    for &(d, i) in keys.iter() {
        let s = &sessions[i as usize];
        due_kwh += s.remaining_kwh();
        prefix_kw += powers[i as usize];
        if powers[i as usize] < s.max_power_kw {
            least.push(Reverse((Ordered(s.laxity(now)), i)));
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
    // then pass 3: the admitted cars by least laxity, each up to its max.
    for pass in [false, true] {
        if left < POWER_EPSILON_KW {
            return;
        }
        rest.clear();
        rest.extend(
            sessions
                .iter()
                .enumerate()
                .filter(|&(i, _)| admitted[i] == pass)
                .map(|(i, s)| {
                    let key = if pass {
                        s.laxity(now)
                    } else {
                        s.departure.unwrap_or(f64::INFINITY)
                    };
                    (key, i as u32)
                }),
        );
        rest.sort_unstable_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        for &(_, i) in rest.iter() {
            let s = &sessions[i as usize];
            let extra = (s.max_power_kw - powers[i as usize]).min(left);
            if extra >= POWER_EPSILON_KW {
                powers[i as usize] += extra;
                left -= extra;
            }
            if left < POWER_EPSILON_KW {
                return;
            }
        }
    }
}
