//! How long the grid took to work again after a fault, from the times NATS stored things (pure,
//! over what [`super::read`] gathered): the first dispatch after the dispatcher's or NATS's
//! return, the resumption of a restarted substation's held sessions (and how many restarted
//! from 0 kWh though the bucket had recorded energy), the first 202 after ingest's return, the
//! first session event of a substation after SIGCONT; for faults nothing returns from, the
//! last request moved or dispatched after the blow, the slowest answer, the longest pause.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use evgrid_model::messages::{RequestRecord, SessionEventKind};
use uuid::Uuid;

use super::check::Event;

/// Energy below this is "from 0 kWh".
const ZERO_KWH: f64 = 1e-9;

/// A recovery measurement.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Recovery {
    /// What was measured, in words.
    pub what: String,
    /// Seconds from the component's return; `None` when it never happened.
    pub seconds: Option<f64>,
    /// Substation restarts: sessions held at the kill, and how they came back.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sessions: Option<HeldSessions>,
}

/// The sessions a killed substation held, after its restart.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct HeldSessions {
    pub held: usize,
    pub resumed: usize,
    /// Resumed from 0 kWh although the bucket had recorded energy for them before the kill.
    pub from_zero: usize,
    /// Held sessions that completed elsewhere (a failover moved them).
    pub elsewhere: usize,
}

fn seconds(from: DateTime<Utc>, to: DateTime<Utc>) -> f64 {
    (to - from).num_microseconds().unwrap_or(i64::MAX) as f64 / 1e6
}

/// Seconds from `back` to the first of `times` at or after it.
pub fn first_after(
    times: impl IntoIterator<Item = DateTime<Utc>>,
    back: DateTime<Utc>,
) -> Option<f64> {
    times
        .into_iter()
        .filter(|t| *t >= back)
        .min()
        .map(|t| seconds(back, t))
}

/// Seconds from `from` to the last of `times` after it (`None` without any).
pub fn last_after(
    times: impl IntoIterator<Item = DateTime<Utc>>,
    from: DateTime<Utc>,
) -> Option<f64> {
    times
        .into_iter()
        .filter(|t| *t >= from)
        .max()
        .map(|t| seconds(from, t))
}

/// The longest wait of `(sent, answered)` pairs, in seconds (`None` without any).
pub fn slowest(pairs: impl IntoIterator<Item = (DateTime<Utc>, DateTime<Utc>)>) -> Option<f64> {
    pairs
        .into_iter()
        .map(|(sent, answered)| seconds(sent, answered))
        .reduce(f64::max)
}

/// The longest stretch without any of `times` from `from` to the last of them: how long a
/// steady flow (202s, dispatches) stopped after a fault. `None` when nothing came after `from`.
pub fn longest_pause(mut times: Vec<DateTime<Utc>>, from: DateTime<Utc>) -> Option<f64> {
    times.retain(|t| *t >= from);
    times.sort();
    let first = *times.first()?;
    let gaps = times.windows(2).map(|w| seconds(w[0], w[1]));
    Some(gaps.fold(seconds(from, first), f64::max))
}

/// The sessions substation `victim` held when it was killed at `killed` (accepted there, not
/// completed there before the kill), and their return after its restart at `back`: the time
/// until the last of them had an event from the restarted process. `before` is the bucket as
/// read just before the kill (energy recorded so far).
pub fn held_sessions(
    events: &[Event],
    victim: &str,
    killed: DateTime<Utc>,
    back: DateTime<Utc>,
    before: &HashMap<Uuid, RequestRecord>,
) -> Recovery {
    let mut held: HashMap<Uuid, Option<&Event>> = HashMap::new();
    let here = |e: &&Event| e.report.event.substation_id == victim;
    for e in events.iter().filter(here).filter(|e| e.stored < killed) {
        let id = e.report.event.request_id;
        if e.report.event.event == SessionEventKind::Completed {
            held.remove(&id);
        } else {
            held.insert(id, None);
        }
    }
    let mut elsewhere = 0;
    for e in events.iter().filter(|e| e.stored >= back) {
        let id = e.report.event.request_id;
        let Some(first) = held.get_mut(&id) else {
            continue;
        };
        if e.report.event.substation_id != victim {
            if e.report.event.event == SessionEventKind::Completed {
                elsewhere += 1;
            }
            continue;
        }
        if first.is_none_or(|f| e.stored < f.stored) {
            *first = Some(e);
        }
    }
    let resumed: Vec<&Event> = held.values().flatten().copied().collect();
    let from_zero = resumed
        .iter()
        .filter(|e| {
            let recorded = before
                .get(&e.report.event.request_id)
                .map_or(0.0, |r| r.energy_delivered_kwh);
            recorded > ZERO_KWH && e.report.event.energy_delivered_kwh < ZERO_KWH
        })
        .count();
    let all_back = resumed.len() == held.len();
    let last = resumed.iter().map(|e| e.stored).max();
    Recovery {
        what: "held sessions resumed after the restart".into(),
        seconds: if all_back {
            Some(last.map_or(0.0, |t| seconds(back, t)))
        } else {
            None
        },
        sessions: Some(HeldSessions {
            held: held.len(),
            resumed: resumed.len(),
            from_zero,
            elsewhere,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chaos::check::fixtures::{event, record, t};
    use evgrid_model::messages::RequestState;

    #[test]
    fn first_event_after_the_return() {
        assert_eq!(first_after([t(100), t(2500), t(1500)], t(1000)), Some(0.5));
        assert_eq!(first_after([t(100)], t(1000)), None);
    }

    #[test]
    fn pauses_and_slowest_answers() {
        let times = vec![t(900), t(1100), t(1200), t(2700), t(2800)];
        assert_eq!(longest_pause(times.clone(), t(1000)), Some(1.5));
        // The wait from the blow to the first counts too.
        assert_eq!(longest_pause(times, t(-1000)), Some(1.9));
        assert_eq!(longest_pause(vec![t(100)], t(1000)), None);
        assert_eq!(slowest([(t(0), t(100)), (t(50), t(400))]), Some(0.35));
        assert_eq!(slowest([]), None);
    }

    #[test]
    fn held_sessions_come_back() {
        use SessionEventKind::{Accepted, Completed, Started};
        let [a, b, c, d] = [(); 4].map(|_| Uuid::new_v4());
        let events = vec![
            event(a, Accepted, "s1", 0, 0.0),
            event(a, Started, "s1", 10, 0.0),
            event(b, Accepted, "s1", 20, 0.0),
            event(c, Accepted, "s1", 30, 0.0),
            event(c, Completed, "s1", 40, 10.0),
            event(d, Accepted, "s2", 50, 0.0),
            // Killed at 100, back at 400.
            event(a, Accepted, "s1", 900, 0.0),
            event(b, Accepted, "s1", 1400, 0.0),
        ];
        let mut rec = record(a, RequestState::Charging, None);
        rec.energy_delivered_kwh = 2.5;
        let before = HashMap::from([(a, rec)]);
        let r = held_sessions(&events, "s1", t(100), t(400), &before);
        let s = r.sessions.unwrap();
        assert_eq!((s.held, s.resumed, s.from_zero), (2, 2, 1));
        assert_eq!(r.seconds, Some(1.0));
        // Without b's return, not every held session came back.
        let r = held_sessions(&events[..7], "s1", t(100), t(400), &before);
        assert_eq!(r.seconds, None);
    }
}
