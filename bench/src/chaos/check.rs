//! The checker: accounts for every request ingest answered 202, from what NATS holds after the
//! run (the request stream, the state bucket, the session events). Pure: the reading is in
//! [`super::read`], so the rules are tested on plain data here.
//!
//! Each accepted request is exactly one of: completed once, rejected (with a reason), DOUBLED
//! (started at two substations, or completed at two, or completed twice; a substation the
//! request was moved away from by failover, as its record's `moved` list says, is not a second
//! start, but a completion there is), LOST (unknown in both
//! `EV_REQUESTS` and the bucket), STUCK (known, not final after the drain window), or
//! INCONSISTENT (the bucket and the session events disagree about a final state).
//!
//! Apart from the verdict, a 202 whose request is not in `EV_REQUESTS` is counted as answered
//! while the store could not persist it: ingest answers 202 only after JetStream's ack, so
//! this finds a write the store acknowledged and then lost (a leader change, a restart).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use chrono::{DateTime, Utc};
use evgrid_model::messages::{RequestRecord, RequestState, SessionEventKind, SessionReport};
use uuid::Uuid;

use super::drive::Accepted;

/// How many ids of each bad verdict the report keeps, to start an investigation from.
const EXAMPLES: usize = 10;

/// A session event and when the server stored it.
#[derive(Debug, Clone)]
pub struct Event {
    pub stored: DateTime<Utc>,
    pub report: SessionReport,
}

/// One request's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    CompletedOnce,
    Rejected,
    Lost,
    Stuck,
    Doubled,
    Inconsistent,
}

/// The accounting of one run.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Accounting {
    pub accepted: usize,
    /// Accepted requests `EV_REQUESTS` does not hold: 202s answered though the store did not
    /// keep the request.
    pub unstored: usize,
    pub counts: BTreeMap<Verdict, usize>,
    /// A few request ids per verdict other than completed once / rejected.
    pub examples: BTreeMap<Verdict, Vec<Uuid>>,
    /// Accept → completed (the completed event's time less the request's acceptance), ms, of
    /// the requests completed once.
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub max_ms: Option<f64>,
}

impl Accounting {
    pub fn count(&self, v: Verdict) -> usize {
        self.counts.get(&v).copied().unwrap_or(0)
    }
}

/// The session events of each request.
pub fn by_request(events: &[Event]) -> HashMap<Uuid, Vec<&Event>> {
    let mut out: HashMap<Uuid, Vec<&Event>> = HashMap::new();
    for e in events {
        out.entry(e.report.event.request_id).or_default().push(e);
    }
    out
}

/// The verdict on one accepted request.
pub fn verdict(
    stored: bool,
    record: Option<&RequestRecord>,
    events: &[&Event],
) -> (Verdict, Option<f64>) {
    let at = |kind| -> BTreeSet<&str> {
        events
            .iter()
            .filter(|e| e.report.event.event == kind)
            .map(|e| e.report.event.substation_id.as_str())
            .collect()
    };
    let completions: Vec<&&Event> = events
        .iter()
        .filter(|e| e.report.event.event == SessionEventKind::Completed)
        .collect();
    // Failover moved the request away from these: it started there, was interrupted, and its
    // remainder charged elsewhere. Charging there counts; completing there would not.
    let moved_from: BTreeSet<&str> = record
        .map(|r| r.moved.iter().map(|m| m.substation_id.as_str()).collect())
        .unwrap_or_default();
    let started_at = at(SessionEventKind::Started);
    let completed_at = at(SessionEventKind::Completed);
    if started_at.difference(&moved_from).count() > 1
        || completed_at.len() > 1
        || completed_at.iter().any(|s| moved_from.contains(s))
        || completions.len() > 1
    {
        return (Verdict::Doubled, None);
    }
    let Some(record) = record else {
        return (
            if stored {
                Verdict::Stuck
            } else {
                Verdict::Lost
            },
            None,
        );
    };
    match (record.state, completions.first()) {
        (RequestState::Completed, Some(done)) => {
            let e = &done.report.event;
            let ms = (e.at - e.accepted_at)
                .num_microseconds()
                .map(|us| us as f64 / 1e3);
            (Verdict::CompletedOnce, ms)
        }
        (RequestState::Rejected, None) if record.reason.is_some() => (Verdict::Rejected, None),
        (RequestState::Completed | RequestState::Rejected, _) => (Verdict::Inconsistent, None),
        // A completed event while the bucket still says otherwise: the state write is late
        // or lost; the run's drain window judges which.
        (_, _) => (Verdict::Stuck, None),
    }
}

/// Accounts for every accepted request.
pub fn account(
    accepted: &[Accepted],
    stored: &HashSet<Uuid>,
    records: &HashMap<Uuid, RequestRecord>,
    events: &[Event],
) -> Accounting {
    let events = by_request(events);
    let mut out = Accounting {
        accepted: accepted.len(),
        ..Default::default()
    };
    let mut latencies = Vec::new();
    for a in accepted {
        let id = a.request_id;
        if !stored.contains(&id) {
            out.unstored += 1;
        }
        let (v, ms) = verdict(
            stored.contains(&id),
            records.get(&id),
            events.get(&id).map_or(&[][..], Vec::as_slice),
        );
        *out.counts.entry(v).or_default() += 1;
        if !matches!(v, Verdict::CompletedOnce | Verdict::Rejected) {
            let examples = out.examples.entry(v).or_default();
            if examples.len() < EXAMPLES {
                examples.push(id);
            }
        }
        latencies.extend(ms);
    }
    latencies.sort_by(f64::total_cmp);
    out.p50_ms = quantile(&latencies, 0.50);
    out.p99_ms = quantile(&latencies, 0.99);
    out.max_ms = latencies.last().copied();
    out
}

/// The `q` quantile of sorted `values` (nearest rank).
pub fn quantile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

/// Session events and records to test the accounting with.
#[cfg(test)]
pub(crate) mod fixtures {
    use super::*;
    use evgrid_model::messages::{ChargeRequest, SessionEvent};

    /// `ms` milliseconds after a fixed instant.
    pub fn t(ms: i64) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(1_800_000_000_000 + ms).expect("in range")
    }

    /// An event of a car accepted at `t(0)`, stored when it happened.
    pub fn event(id: Uuid, kind: SessionEventKind, at: &str, ms: i64, kwh: f64) -> Event {
        Event {
            stored: t(ms),
            report: SessionReport {
                event: SessionEvent {
                    event: kind,
                    request_id: id,
                    substation_id: at.into(),
                    vehicle_id: "v".into(),
                    at: t(ms),
                    energy_kwh: 10.0,
                    energy_delivered_kwh: kwh,
                    accepted_at: t(0),
                    dispatched_at: t(0),
                },
                outcome: None,
            },
        }
    }

    pub fn record(id: Uuid, state: RequestState, reason: Option<&str>) -> RequestRecord {
        let request = ChargeRequest {
            request_id: Some(id),
            vehicle_id: "v".into(),
            energy_kwh: 10.0,
            max_power_kw: 11.0,
            departure: None,
            all_or_nothing: false,
        };
        let mut r = RequestRecord::new(id, state, &request, t(0), t(0));
        r.reason = reason.map(str::to_owned);
        r
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::{event, record, t};
    use super::*;

    #[test]
    fn every_verdict() {
        use SessionEventKind::{Completed, Started};
        let ids: Vec<Uuid> = (0..7).map(|_| Uuid::new_v4()).collect();
        let accepted: Vec<Accepted> = ids
            .iter()
            .map(|&request_id| Accepted {
                request_id,
                sent: t(0),
                at: t(0),
                attempts: 1,
            })
            .collect();
        let stored: HashSet<Uuid> = ids[..6].iter().copied().collect();
        let mut records = HashMap::new();
        records.insert(
            ids[0],
            record(ids[0], RequestState::Completed, Some("delivered")),
        );
        records.insert(
            ids[1],
            record(ids[1], RequestState::Rejected, Some("undeliverable")),
        );
        records.insert(ids[2], record(ids[2], RequestState::Charging, None));
        records.insert(ids[3], record(ids[3], RequestState::Completed, None));
        records.insert(ids[4], record(ids[4], RequestState::Completed, None));
        // ids[5]: stored, never recorded (stuck); ids[6]: nowhere (lost).
        let events = vec![
            event(ids[0], Started, "s1", 1000, 0.0),
            event(ids[0], Completed, "s1", 3000, 0.0),
            event(ids[2], Started, "s1", 1000, 0.0),
            // Started at two substations.
            event(ids[3], Started, "s1", 1000, 0.0),
            event(ids[3], Started, "s2", 2000, 0.0),
            event(ids[3], Completed, "s2", 4000, 0.0),
            // Completed in the bucket, no completed event.
            event(ids[4], Started, "s1", 1000, 0.0),
        ];
        let a = account(&accepted, &stored, &records, &events);
        assert_eq!(a.accepted, 7);
        assert_eq!(a.unstored, 1);
        assert_eq!(a.count(Verdict::CompletedOnce), 1);
        assert_eq!(a.count(Verdict::Rejected), 1);
        assert_eq!(a.count(Verdict::Stuck), 2);
        assert_eq!(a.count(Verdict::Doubled), 1);
        assert_eq!(a.count(Verdict::Inconsistent), 1);
        assert_eq!(a.count(Verdict::Lost), 1);
        assert_eq!(a.examples[&Verdict::Lost], vec![ids[6]]);
        assert_eq!(a.p99_ms, Some(3000.0));
    }

    #[test]
    fn a_move_by_failover_is_not_a_second_start_but_a_completion_there_is() {
        use SessionEventKind::{Completed, Started};
        let id = Uuid::new_v4();
        let mut r = record(id, RequestState::Completed, Some("delivered"));
        r.moved.push(evgrid_model::messages::Move {
            substation_id: "s1".into(),
            dispatch_seq: 1,
            state: RequestState::Charging,
            energy_delivered_kwh: 2.0,
            moved_at: t(1500),
            reason: "no heartbeat from s1 for 10 s".into(),
        });
        let moved = [
            event(id, Started, "s1", 1000, 0.0),
            event(id, Started, "s2", 2000, 2.0),
            event(id, Completed, "s2", 4000, 10.0),
        ];
        let refs: Vec<&Event> = moved.iter().collect();
        assert_eq!(verdict(true, Some(&r), &refs).0, Verdict::CompletedOnce);
        let also_there = [
            event(id, Started, "s1", 1000, 0.0),
            event(id, Completed, "s1", 1800, 10.0),
            event(id, Started, "s2", 2000, 2.0),
        ];
        let refs: Vec<&Event> = also_there.iter().collect();
        assert_eq!(verdict(true, Some(&r), &refs).0, Verdict::Doubled);
    }

    #[test]
    fn completed_twice_at_one_substation_is_doubled() {
        let id = Uuid::new_v4();
        let e = [
            event(id, SessionEventKind::Completed, "s1", 1000, 0.0),
            event(id, SessionEventKind::Completed, "s1", 2000, 0.0),
        ];
        let r = record(id, RequestState::Completed, Some("delivered"));
        let refs: Vec<&Event> = e.iter().collect();
        assert_eq!(verdict(true, Some(&r), &refs).0, Verdict::Doubled);
    }

    #[test]
    fn quantiles() {
        assert_eq!(quantile(&[], 0.99), None);
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.99), Some(99.0));
        assert_eq!(quantile(&v, 0.5), Some(50.0));
        assert_eq!(quantile(&[7.0], 0.99), Some(7.0));
    }
}
