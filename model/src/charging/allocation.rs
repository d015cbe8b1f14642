//! How a substation shares its capacity among the cars it charges: the [`Allocation`] policies,
//! each a pure function of the sessions and the time ([`allocate`]). The [`super::Station`]
//! model calls it on every arrival, completion, departure and capacity change.

use super::{POWER_EPSILON_KW, Session};

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
    /// power (how long the car can still wait and be full at departure).
    #[default]
    Llf,
    /// First come, first served: cars in arrival order each get min(max power, capacity left);
    /// a car offered nothing waits (queued) and starts when power frees up.
    Fcfs,
}

impl Allocation {
    /// Every policy, for sweeps (`--allocation all` in the simulator).
    pub const ALL: [Allocation; 4] = [
        Allocation::EqualShare,
        Allocation::Edf,
        Allocation::Llf,
        Allocation::Fcfs,
    ];

    /// The name used on the command line and in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::EqualShare => "equal-share",
            Self::Edf => "edf",
            Self::Llf => "llf",
            Self::Fcfs => "fcfs",
        }
    }

    /// Whether the allocation can change between events with time alone (not only when a car
    /// arrives or leaves, or the capacity changes).
    pub fn depends_on_time(self) -> bool {
        matches!(self, Self::Llf)
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
        &mut Vec::new(),
        &mut powers,
    );
    powers
}

/// [`allocate`] into `powers` (one per session), with `keys` as scratch space: no allocation
/// once the buffers have grown to the number of sessions.
pub(super) fn allocate_into(
    policy: Allocation,
    capacity_kw: f64,
    sessions: &[Session],
    now: f64,
    keys: &mut Vec<(f64, u32)>,
    powers: &mut [f64],
) {
    let capacity_kw = capacity_kw.max(0.0);
    let key = |s: &Session| -> f64 {
        match policy {
            Allocation::EqualShare => s.max_power_kw,
            Allocation::Edf => s.departure.unwrap_or(f64::INFINITY),
            Allocation::Llf => s.laxity(now),
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
            Allocation::Edf | Allocation::Llf | Allocation::Fcfs => left,
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
