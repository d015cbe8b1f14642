//! What a substation does with each dispatch message on `ev.dispatch.<id>`: the pure decision
//! of ingest → dispatcher → **substation**, as the dispatcher's `request::plan` is for requests.
//!
//! [`plan`] takes what the shell knows about a delivered message (its body, whether a session
//! of the same request is live here, the request's stored state, the time) and names the one
//! thing to do: keep holding it, skip it, retry it later, terminate it, or charge it (new, or
//! resumed from the energy already recorded). No NATS and no clock reads: each case is unit
//! tested below. [`Taken`] is the dispatches handled so far, as the heartbeat echoes them.

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use evgrid_model::messages::{ChargerSession, Dispatch, Move, RequestRecord};
use evgrid_model::validate::{RequestError, check_dispatch};

/// The dispatches this process has handled, as the heartbeat echoes them (`dispatch_seq`): the
/// dispatcher stops counting an assignment as in flight once the echo reaches its sequence.
#[derive(Debug, Default)]
pub(crate) struct Taken {
    /// The highest sequence handled.
    highest: u64,
    /// Sequences handed back for later (their state could not be read), not handled since.
    held_back: BTreeSet<u64>,
}

impl Taken {
    pub fn took(&mut self, seq: u64) {
        self.held_back.remove(&seq);
        self.highest = self.highest.max(seq);
    }

    pub fn held_back(&mut self, seq: u64) {
        self.held_back.insert(seq);
    }

    /// The highest sequence below which every dispatch is handled: an assignment handed back
    /// is not in the load yet, so the echo stays below it until it is.
    pub fn echo(&self) -> u64 {
        match self.held_back.first() {
            Some(&first) if first <= self.highest => first - 1,
            _ => self.highest,
        }
    }
}

/// Why a dispatch message can never be charged: it is terminated, never redelivered.
#[derive(Debug, thiserror::Error)]
pub(crate) enum InvalidDispatch {
    #[error("not a dispatch")]
    NotADispatch(#[source] serde_json::Error),
    /// The fields break the rules of a request (`evgrid_model::validate::check_dispatch`).
    #[error("fields out of bounds")]
    Fields(#[source] RequestError),
    /// A dispatch on this substation's subject naming another substation.
    #[error("for substation {named:?}, not this one")]
    NotOurs { named: String },
}

/// A dispatch body for substation `own_id` that the model can charge: checked by the rules of a
/// request, so nothing a client could not ask over HTTP is charged.
pub(crate) fn parse_dispatch(payload: &[u8], own_id: &str) -> Result<Dispatch, InvalidDispatch> {
    let d: Dispatch = serde_json::from_slice(payload).map_err(InvalidDispatch::NotADispatch)?;
    check_dispatch(&d).map_err(InvalidDispatch::Fields)?;
    if d.substation_id != own_id {
        return Err(InvalidDispatch::NotOurs {
            named: d.substation_id,
        });
    }
    Ok(d)
}

/// The request's record in `EV_REQUEST_STATE`, as read for a dispatch.
#[derive(Debug, Clone)]
pub(crate) enum Stored {
    /// Read: the record, or `None` when there is none (or it does not parse).
    Read(Option<Box<RequestRecord>>),
    /// The read failed (NATS unavailable): nothing can be decided safely.
    Unreadable,
}

/// What one delivered dispatch message is about, as the shell sees it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Facts<'a> {
    /// This substation's id.
    pub own_id: &'a str,
    /// The message's `EV_DISPATCH` sequence.
    pub stream_seq: u64,
    /// How many times the consumer delivered it (1 the first time).
    pub delivery: i64,
    /// The `EV_DISPATCH` sequence of the message held by a live session of the same request
    /// here, if there is one.
    pub held_seq: Option<u64>,
    /// Wall time now.
    pub now: DateTime<Utc>,
    /// Simulated seconds per wall second.
    pub time_scale: f64,
}

/// Why a dispatch is acked without charging.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Skip {
    /// A second dispatch of a session that is live here.
    DuplicateHere,
    /// The request is already `completed` or `rejected`.
    Finished,
    /// Another substation took it first (dispatched twice, an ack lost past the dedupe window):
    /// one car charges in one place.
    TakenElsewhere,
    /// The request was moved away from this dispatch while this substation was out (failover):
    /// the dispatch is void.
    MovedAway,
}

/// A session to charge here.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Accept {
    /// Energy recorded before this delivery (a resumed session), kWh; never above the request.
    pub prior_kwh: f64,
    /// Wall time of the session's first power ever (kept across resumptions).
    pub charging_started_at: Option<DateTime<Utc>>,
    /// The substations the request was moved away from before (failover), kept in its record.
    pub moved: Vec<Move>,
    /// Simulated seconds from now until the car leaves, if it has a departure. A session taken
    /// here before has been at the substation since its dispatch: that time counts against its
    /// stay, so a restart never extends it.
    pub stay_left_s: Option<f64>,
    /// The station transaction a resumed session charges in (`--chargers ocpp`).
    pub charger: Option<ChargerSession>,
}

/// What to do with a dispatch message.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Plan {
    /// The very message a live session holds, delivered again (an ack wait passed): keep
    /// holding it, through the newest delivery.
    KeepHolding,
    /// Ack it and do nothing else.
    Skip(Skip),
    /// The state could not be read: hand it back for later, and keep the echo below it.
    Retry,
    /// Charge it.
    Accept(Accept),
}

/// The plan for `dispatch` (a body that parsed) given `facts` and the request's `stored` state.
pub(crate) fn plan(dispatch: &Dispatch, facts: Facts<'_>, stored: &Stored) -> Plan {
    if let Some(held) = facts.held_seq {
        return if held == facts.stream_seq {
            Plan::KeepHolding
        } else {
            Plan::Skip(Skip::DuplicateHere)
        };
    }
    let record = match stored {
        Stored::Read(record) => record.as_deref(),
        Stored::Unreadable => return Plan::Retry,
    };
    if record.is_some_and(|r| r.state.is_final()) {
        return Plan::Skip(Skip::Finished);
    }
    let moved_away = record.is_some_and(|r| {
        r.moved
            .iter()
            .any(|m| m.substation_id == facts.own_id && m.dispatch_seq == facts.stream_seq)
    });
    if moved_away {
        return Plan::Skip(Skip::MovedAway);
    }
    let taken_by = record.and_then(|r| r.substation_id.as_deref());
    if taken_by.is_some_and(|other| other != facts.own_id) {
        return Plan::Skip(Skip::TakenElsewhere);
    }
    // A record naming this substation is also what the dispatcher writes as it dispatches, so
    // only a redelivery can be a session taken here before (a crash or a shutdown hands the
    // message back; a first delivery never is).
    let resumed = taken_by.is_some() && facts.delivery > 1;
    let stayed_s = if resumed {
        let wall_ms = (facts.now - dispatch.dispatched_at).num_milliseconds();
        wall_ms.max(0) as f64 / 1000.0 * facts.time_scale
    } else {
        0.0
    };
    Plan::Accept(Accept {
        prior_kwh: record.map_or(0.0, |r| {
            r.energy_delivered_kwh
                .clamp(0.0, dispatch.energy_target_kwh())
        }),
        charging_started_at: record.and_then(|r| r.charging_started_at),
        moved: record.map(|r| r.moved.clone()).unwrap_or_default(),
        // The departure keeps its distance from acceptance, on the simulated clock.
        stay_left_s: dispatch
            .departure
            .map(|d| (d - dispatch.accepted_at).num_milliseconds() as f64 / 1000.0 - stayed_s),
        charger: record.and_then(|r| r.charger.clone()).filter(|_| resumed),
    })
}

#[cfg(test)]
mod tests {
    use evgrid_model::messages::RequestState;
    use uuid::Uuid;

    use super::*;

    #[test]
    fn the_echo_stays_below_a_dispatch_handed_back_until_it_is_taken() {
        let mut taken = Taken::default();
        assert_eq!(taken.echo(), 0);
        taken.took(3);
        taken.held_back(5);
        assert_eq!(taken.echo(), 3);
        // Later dispatches are taken, but the one handed back is not in the load yet.
        taken.took(6);
        taken.took(7);
        assert_eq!(taken.echo(), 4);
        taken.took(5);
        assert_eq!(taken.echo(), 7);
        // Handed back again and again, then taken: no trace left.
        taken.held_back(9);
        taken.held_back(9);
        assert_eq!(taken.echo(), 7);
        taken.took(9);
        assert_eq!(taken.echo(), 9);
    }

    #[test]
    fn dispatches_follow_the_rules_of_a_request() {
        let body = |substation: &str, energy: f64, power: f64| {
            serde_json::json!({
                "request_id": Uuid::nil(), "substation_id": substation, "vehicle_id": "ev",
                "energy_kwh": energy, "max_power_kw": power,
                "accepted_at": "2025-01-01T00:00:00Z", "dispatched_at": "2025-01-01T00:00:01Z",
                "request_seq": 1
            })
            .to_string()
        };
        let parse = |b: String| parse_dispatch(b.as_bytes(), "s1");
        assert!(parse(body("s1", 10.0, 11.0)).is_ok());
        for bad in [
            body("s1", 0.0, 11.0),
            body("s1", 10.0, -1.0),
            body("s1", 1e300, 11.0),
            body("s1", 10.0, 0.5),
        ] {
            assert!(
                matches!(parse(bad.clone()), Err(InvalidDispatch::Fields(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            parse(body("s2", 10.0, 11.0)),
            Err(InvalidDispatch::NotOurs { .. })
        ));
        assert!(parse_dispatch(b"not json", "s1").is_err());
    }

    fn at(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + s, 0).unwrap()
    }

    fn dispatch() -> Dispatch {
        Dispatch {
            request_id: Uuid::nil(),
            substation_id: "s1".into(),
            vehicle_id: "ev".into(),
            energy_kwh: 30.0,
            energy_expected_kwh: None,
            max_power_kw: 11.0,
            departure: Some(at(7200)),
            accepted_at: at(0),
            dispatched_at: at(10),
            request_seq: 1,
        }
    }

    fn facts(held_seq: Option<u64>, now: DateTime<Utc>) -> Facts<'static> {
        Facts {
            own_id: "s1",
            stream_seq: 7,
            delivery: 2,
            held_seq,
            now,
            time_scale: 60.0,
        }
    }

    fn record(state: RequestState, substation: Option<&str>, delivered: f64) -> Stored {
        Stored::Read(Some(Box::new(RequestRecord {
            request_id: Uuid::nil(),
            state,
            vehicle_id: "ev".into(),
            energy_kwh: 30.0,
            energy_expected_kwh: None,
            max_power_kw: 11.0,
            departure: Some(at(7200)),
            substation_id: substation.map(str::to_owned),
            energy_delivered_kwh: delivered,
            reason: None,
            accepted_at: at(0),
            dispatched_at: Some(at(10)),
            charging_started_at: (delivered > 0.0).then(|| at(20)),
            completed_at: None,
            rejected_at: None,
            updated_at: at(20),
            moved: Vec::new(),
            charger: Some(ChargerSession {
                station_id: "st-1".into(),
                transaction_id: "tx-1".into(),
                energy_before_kwh: 0.0,
            }),
        })))
    }

    #[test]
    fn a_new_dispatch_is_charged_for_its_whole_stay() {
        let new = plan(&dispatch(), facts(None, at(11)), &Stored::Read(None));
        assert_eq!(
            new,
            Plan::Accept(Accept {
                prior_kwh: 0.0,
                charging_started_at: None,
                moved: Vec::new(),
                stay_left_s: Some(7200.0),
                charger: None,
            })
        );
        // The queued state the dispatcher wrote is not a claim by any substation.
        let queued = record(RequestState::Queued, None, 0.0);
        assert!(matches!(plan_of(&queued), Plan::Accept(a) if a.stay_left_s == Some(7200.0)));
        // Nor is the `dispatched` it writes as it sends the request here: on a first delivery
        // none of the stay is gone.
        let sent_here = record(RequestState::Dispatched, Some("s1"), 0.0);
        let first = Facts {
            delivery: 1,
            ..facts(None, at(20))
        };
        assert!(
            matches!(plan(&dispatch(), first, &sent_here), Plan::Accept(a) if a.stay_left_s == Some(7200.0))
        );
    }

    fn plan_of(stored: &Stored) -> Plan {
        plan(&dispatch(), facts(None, at(20)), stored)
    }

    #[test]
    fn a_resumed_session_goes_on_from_its_recorded_energy_and_keeps_its_departure() {
        // Taken here before, 10 wall seconds after dispatch at 60x: 600 s of its stay are gone.
        let stored = record(RequestState::Charging, Some("s1"), 12.5);
        assert_eq!(
            plan_of(&stored),
            Plan::Accept(Accept {
                prior_kwh: 12.5,
                charging_started_at: Some(at(20)),
                moved: Vec::new(),
                stay_left_s: Some(7200.0 - 600.0),
                // And in the station transaction it charged in (--chargers ocpp).
                charger: Some(ChargerSession {
                    station_id: "st-1".into(),
                    transaction_id: "tx-1".into(),
                    energy_before_kwh: 0.0,
                }),
            })
        );
        // A recorded energy above the request (a corrupt record) is capped.
        let over = record(RequestState::Charging, Some("s1"), 99.0);
        assert!(matches!(plan_of(&over), Plan::Accept(a) if a.prior_kwh == 30.0));
    }

    #[test]
    fn another_substations_request_is_skipped() {
        let stored = record(RequestState::Dispatched, Some("s2"), 0.0);
        assert_eq!(plan_of(&stored), Plan::Skip(Skip::TakenElsewhere));
    }

    #[test]
    fn a_dispatch_the_request_moved_away_from_is_void() {
        let Stored::Read(Some(mut moved)) = record(RequestState::Queued, None, 4.0) else {
            unreachable!()
        };
        moved.moved.push(Move {
            substation_id: "s1".into(),
            dispatch_seq: 7,
            state: RequestState::Charging,
            energy_delivered_kwh: 4.0,
            moved_at: at(15),
            reason: "no heartbeat from s1 for 10 s".into(),
        });
        assert_eq!(
            plan_of(&Stored::Read(Some(moved.clone()))),
            Plan::Skip(Skip::MovedAway)
        );
        // Sent back here later by a new dispatch: charged, from the energy it got.
        let again = Facts {
            stream_seq: 9,
            ..facts(None, at(20))
        };
        assert!(matches!(
            plan(&dispatch(), again, &Stored::Read(Some(moved))),
            Plan::Accept(a) if a.prior_kwh == 4.0 && a.moved.len() == 1
        ));
    }

    #[test]
    fn a_finished_request_is_skipped() {
        for state in [RequestState::Completed, RequestState::Rejected] {
            let stored = record(state, Some("s1"), 30.0);
            assert_eq!(plan_of(&stored), Plan::Skip(Skip::Finished));
        }
    }

    #[test]
    fn an_unreadable_state_is_retried() {
        assert_eq!(plan_of(&Stored::Unreadable), Plan::Retry);
    }

    #[test]
    fn a_live_session_keeps_its_message_and_skips_a_second_dispatch() {
        let same = plan(&dispatch(), facts(Some(7), at(20)), &Stored::Unreadable);
        assert_eq!(same, Plan::KeepHolding);
        let other = plan(&dispatch(), facts(Some(3), at(20)), &Stored::Read(None));
        assert_eq!(other, Plan::Skip(Skip::DuplicateHere));
    }
}
