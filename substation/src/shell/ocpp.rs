//! The shell's side of `--chargers ocpp` (docs/ocpp.md): a dispatched session waits for its
//! car without power; the car's transaction at a station makes it a metered session of the
//! model (a car without a request, a walk-in, becomes a session of its own); the powers the
//! model allocates go to the stations as charging limits ([`Chargers::limits`]); meter readings
//! are the energy delivered; the transaction's end completes the session. What each station
//! can be trusted with is [`Chargers`]' to say; the shell pins the model to it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use evgrid_model::charging::{Arrival, Event};
use evgrid_model::messages::{Dispatch, SessionEventKind, SessionOutcome};
use evgrid_ocpp::messages::{ChargingNeeds, TransactionEventRequest};
use evgrid_ocpp::server::{Command, Csms, Outcome, StationEvent};
use tokio::sync::mpsc;
use uuid::Uuid;

use super::Shell;
use crate::chargers::{Chargers, Tx};
use crate::session::Live;

/// Longest idToken OCPP 2.0.1 carries: a `vehicle_id` longer than this is known by its
/// request id only.
const ID_TOKEN_MAX_CHARS: usize = 36;
/// What a walk-in is planned with until its car says what it needs (NotifyEVChargingNeeds):
/// a day's driving for most cars. The car ends its session itself when it is full.
const WALK_IN_KWH: f64 = 20.0;
/// Energy within this of the target is the target (kWh): meters count in Wh.
const FULL_EPSILON_KWH: f64 = 1e-3;
/// How often the stations' limits follow the allocation (an arrival, a car full, an answer
/// making room): each station gets at most one limit per round, where sending on every change
/// sent a thousand stations 80 limits each while a thousand cars plugged in. What makes the
/// sum of the limits in force exceed the capacity (a lower capacity, a station counted at its
/// worst) is sent at once.
pub(super) const LIMIT_ROUND: Duration = Duration::from_millis(200);

/// The charging stations of one substation: the CSMS they connect to and the bookkeeping of
/// who charges where.
pub(crate) struct Ocpp {
    csms: Arc<Csms>,
    events: mpsc::UnboundedReceiver<StationEvent>,
    pub(crate) chargers: Chargers,
}

impl Ocpp {
    pub fn new(
        csms: Arc<Csms>,
        events: mpsc::UnboundedReceiver<StationEvent>,
        station_max_kw: f64,
    ) -> Self {
        Self {
            csms,
            events,
            chargers: Chargers::new(station_max_kw),
        }
    }

    fn send(&self, sends: impl IntoIterator<Item = (String, Command)>) {
        for (station, command) in sends {
            tracing::debug!(%station, ?command, "to station");
            if !self.csms.send(&station, command) {
                // Out of reach: counted at its worst case until it returns, and sent its limit
                // then.
                tracing::debug!(%station, "station not connected; command not sent");
            }
        }
    }

    /// Session `id` is over here: gives back its reservation and clears its limit.
    pub fn forget(&mut self, id: Uuid) {
        let sends = self.chargers.forget(id, Utc::now());
        self.send(sends);
    }
}

/// The next station event, or never without stations.
pub(super) async fn next_event(ocpp: &mut Option<Ocpp>) -> Option<StationEvent> {
    match ocpp {
        Some(ocpp) => ocpp.events.recv().await,
        None => std::future::pending().await,
    }
}

impl Shell {
    fn chargers(&mut self) -> &mut Ocpp {
        self.ocpp.as_mut().expect("--chargers ocpp")
    }

    /// A dispatched session waits for its car: known by its `vehicle_id` and its request id
    /// as idTokens, with a connector reserved for it when one is free. A resumed session whose
    /// car was charging (its record names the station transaction) takes that transaction
    /// back, now if it is going on already.
    pub(super) fn await_car(&mut self, id: Uuid) {
        let live = &self.sessions[&id];
        let d = &live.dispatch;
        let mut tokens = Vec::new();
        if d.vehicle_id.chars().count() <= ID_TOKEN_MAX_CHARS {
            tokens.push(d.vehicle_id.clone());
        }
        tokens.push(id.to_string());
        let departure = d.departure;
        if let Some(charger) = live.charger.clone() {
            let ocpp = self.chargers();
            let going_on = ocpp.chargers.expect(
                id,
                &charger.station_id,
                &charger.transaction_id,
                charger.energy_before_kwh,
            );
            ocpp.chargers.await_token(id, tokens);
            if let Some(event) = going_on {
                tracing::info!(request_id = %id, station = %charger.station_id, "resumed session takes its transaction back");
                self.bind(id, &charger.station_id, &event, charger.energy_before_kwh);
                self.share_capacity();
            }
            return;
        }
        let ocpp = self.chargers();
        let reserve = ocpp.chargers.await_car(id, tokens, departure, Utc::now());
        ocpp.send(reserve);
    }

    /// The session `id` charges in `station`'s transaction of `event`, its request having had
    /// `energy_before_kwh` before it.
    fn bind(
        &mut self,
        id: Uuid,
        station: &str,
        event: &TransactionEventRequest,
        energy_before_kwh: f64,
    ) {
        let ocpp = self.chargers();
        let cancel = ocpp.chargers.plug(id, station, event, energy_before_kwh);
        ocpp.send(cancel);
        tracing::info!(request_id = %id, station, transaction = %event.transaction_info.transaction_id, "car plugged in");
        self.on_metered(id);
    }

    /// What the transactions nobody claimed yet may draw (kW): kept out of the capacity the
    /// policy shares.
    pub(super) fn orphans_kw(&self) -> f64 {
        self.ocpp
            .as_ref()
            .map_or(0.0, |ocpp| ocpp.chargers.orphans_kw())
    }

    /// Transactions no resumed session claimed within the grace: charged as walk-ins.
    pub(super) fn adopt_unclaimed(&mut self) {
        let Some(ocpp) = &mut self.ocpp else {
            return;
        };
        let unclaimed = ocpp.chargers.unclaimed(Instant::now());
        if unclaimed.is_empty() {
            return;
        }
        for (station, event) in unclaimed {
            tracing::warn!(%station, transaction = %event.transaction_info.transaction_id, "a transaction nobody claimed: charged as a walk-in");
            self.walk_in(&station, &event, None);
        }
        self.share_capacity();
    }

    /// What a station did.
    pub(super) fn on_station(&mut self, event: StationEvent) {
        match event {
            StationEvent::Connected { station } => {
                self.chargers().chargers.on_connected(&station);
                let ids = self.chargers().chargers.sessions_at(&station);
                self.repin(&ids);
            }
            StationEvent::Booted { station } => {
                let ocpp = self.chargers();
                let default = ocpp.chargers.on_booted(&station);
                ocpp.send([(station, default)]);
                let reserve = ocpp.chargers.reserve_waiting(Utc::now());
                ocpp.send(reserve);
            }
            StationEvent::Disconnected { station } => {
                let ids = self.chargers().chargers.on_disconnected(&station);
                self.repin(&ids);
            }
            StationEvent::Transaction { station, event } => self.on_transaction(&station, &event),
            StationEvent::Meter {
                station,
                evse_id,
                energy_wh,
                power_w,
            } => {
                let id = self.chargers().chargers.on_meter(
                    &station,
                    evse_id,
                    energy_wh,
                    power_w,
                    Instant::now(),
                );
                if let Some(id) = id {
                    self.on_metered(id);
                }
            }
            StationEvent::Needs {
                station,
                evse_id,
                needs,
            } => self.on_needs(&station, evse_id, &needs),
            StationEvent::Answered {
                station,
                command,
                outcome,
            } => {
                tracing::debug!(%station, ?command, ?outcome, "station answered");
                if matches!(command, Command::SetLimit { .. }) {
                    match outcome {
                        Outcome::Accepted => self.metrics.ocpp_limits_accepted.inc(),
                        Outcome::Refused(_) | Outcome::TimedOut => {
                            self.metrics.ocpp_limits_refused.inc()
                        }
                        Outcome::Unreachable => {}
                    }
                }
                let ocpp = self.chargers();
                let changed =
                    ocpp.chargers
                        .on_answered(&station, &command, &outcome, Instant::now());
                let ids = if changed {
                    ocpp.chargers.sessions_at(&station)
                } else {
                    Vec::new()
                };
                // Also when nothing changed: an accepted decrease may make room for raises.
                self.repin(&ids);
            }
        }
    }

    /// Sends the stations the limits that follow from the model's powers: at each limit round
    /// when the allocation changed, and at once for a new capacity or a station newly counted
    /// at its worst case.
    pub(super) fn send_limits(&mut self) {
        self.limits_due = false;
        let Some(ocpp) = &mut self.ocpp else {
            return;
        };
        let capacity_kw = self.station.capacity_kw();
        let powers = self
            .station
            .sessions()
            .iter()
            .map(|s| (s.id, s.power_kw, s.pinned_kw.is_some()));
        let sends = ocpp.chargers.limits(powers, capacity_kw);
        self.metrics.ocpp_limits_sent.inc_by(sends.len() as u64);
        ocpp.send(sends);
    }

    /// Pins sessions `ids` in the model at what their stations can be trusted with, and
    /// reallocates (the limits follow at the next round, or at once when a station got worse).
    fn repin(&mut self, ids: &[Uuid]) {
        let events = self.advanced();
        self.repin_after(ids, events);
    }

    /// [`Self::repin`] after a change of the model that made `events`; a session newly
    /// counted at its worst case has the others' limits lowered at once.
    fn repin_after(&mut self, ids: &[Uuid], mut events: Vec<Event>) {
        let mut worse = false;
        for &id in ids {
            let ocpp = self.ocpp.as_ref().expect("--chargers ocpp");
            let pin = ocpp.chargers.pin_kw(id);
            let Some(session) = self.station.session(id) else {
                continue;
            };
            if session.pinned_kw != pin {
                if pin.is_some() {
                    self.metrics.ocpp_worst_case.inc();
                    worse = true;
                }
                events.extend(self.station.pin(id, pin).unwrap_or_default());
            }
        }
        self.apply(events);
        if worse {
            self.send_limits();
        }
    }

    fn on_transaction(&mut self, station: &str, event: &TransactionEventRequest) {
        let orphans_kw = self.orphans_kw();
        match self
            .chargers()
            .chargers
            .on_transaction(station, event, Instant::now())
        {
            Tx::New {
                awaited: Some(id),
                energy_before_kwh,
                ..
            } => {
                // A new transaction starts from what the request had; a resumed one from what
                // its record says it had before the transaction.
                let before = energy_before_kwh
                    .unwrap_or_else(|| self.sessions.get(&id).map_or(0.0, |l| l.prior_kwh));
                self.bind(id, station, event, before);
            }
            Tx::New {
                awaited: None,
                id_token,
                ..
            } => self.walk_in(station, event, id_token),
            Tx::Orphan(new) => {
                if new {
                    tracing::info!(station, transaction = %event.transaction_info.transaction_id, "a transaction going on that no session knows yet: counted at its station's most");
                }
            }
            Tx::Metered(id) => self.on_metered(id),
            Tx::Ended(id) => self.on_unplugged(id),
            Tx::Ignored => {}
        }
        // A transaction unclaimed appeared, or one ended or was claimed: the capacity the
        // policy shares follows.
        if self.orphans_kw() != orphans_kw {
            self.share_capacity();
        }
    }

    /// A car without a request plugged in: a session of its own, like any other.
    fn walk_in(&mut self, station: &str, event: &TransactionEventRequest, token: Option<String>) {
        let id = Uuid::new_v4();
        let now = Utc::now();
        let max_power_kw = self.chargers().chargers.station_max_kw();
        let dispatch = Dispatch {
            request_id: id,
            substation_id: self.id.clone(),
            vehicle_id: token.unwrap_or_else(|| format!("walk-in-{station}")),
            energy_kwh: WALK_IN_KWH,
            energy_expected_kwh: None,
            max_power_kw,
            departure: None,
            accepted_at: now,
            dispatched_at: now,
            request_seq: 0,
        };
        tracing::info!(request_id = %id, station, vehicle_id = %dispatch.vehicle_id, "walk-in car plugged in");
        self.metrics.ocpp_walk_ins.inc();
        let live = Live::walk_in(dispatch);
        self.send_event(&live, SessionEventKind::Accepted, now, 0.0, None);
        let record = self.record(&live, live.waiting_state(), 0.0, None);
        self.sessions.insert(id, live);
        self.write_state(record, false);
        self.chargers().chargers.plug(id, station, event, 0.0);
        let car = Arrival {
            id,
            max_power_kw,
            energy_kwh: WALK_IN_KWH,
            departure: None,
        };
        let pin = self.chargers().chargers.pin_kw(id);
        let mut events = self.advanced();
        let at = self.station.now();
        events.extend(self.station.arrive_pinned(at, car, pin));
        self.apply(events);
        self.on_metered(id);
    }

    /// A reading of session `id`'s meter: the truth for its energy. A session with all its
    /// energy is asked to stop.
    fn on_metered(&mut self, id: Uuid) {
        self.metrics.ocpp_meter_readings.inc();
        let mut events = self.advanced();
        let ocpp = self.ocpp.as_ref().expect("--chargers ocpp");
        let Some(plug) = ocpp.chargers.plug_of(id) else {
            return;
        };
        // The model counts this process's share of the request: the transaction's meter less
        // what was recorded before this process took the session.
        let prior_kwh = self.sessions.get(&id).map_or(0.0, |l| l.prior_kwh);
        let delivered = (plug.base_kwh + plug.meter_kwh - prior_kwh).max(0.0);
        events.extend(self.station.meter(id, delivered, None).unwrap_or_default());
        self.repin_after(&[id], events);
        self.stop_if_full(id);
    }

    fn stop_if_full(&mut self, id: Uuid) {
        let full = self
            .station
            .session(id)
            .is_some_and(|s| s.energy_kwh - s.delivered_kwh <= FULL_EPSILON_KWH);
        if full {
            let ocpp = self.chargers();
            let stop = ocpp.chargers.stop(id);
            if stop.is_some() {
                tracing::info!(request_id = %id, "energy delivered: asking the station to stop");
            }
            ocpp.send(stop);
        }
    }

    /// What the car says it needs: its energy (capped at the request's) and departure.
    fn on_needs(&mut self, station: &str, evse_id: i32, needs: &ChargingNeeds) {
        let Some(id) = self.chargers().chargers.session_at(station, evse_id) else {
            return;
        };
        let mut events = self.advanced();
        let (Some(session), Some(live)) = (self.station.session(id), self.sessions.get_mut(&id))
        else {
            return;
        };
        let walk_in = live.acker.is_none();
        let energy_kwh = match needs.energy_wh().map(|wh| wh / 1000.0) {
            Some(kwh) if walk_in => {
                live.dispatch.energy_kwh = kwh;
                kwh
            }
            Some(kwh) => kwh.min(session.energy_kwh),
            None => session.energy_kwh,
        };
        let departure = needs.departure_time.map(|wall| {
            let left_s = (wall - Utc::now()).num_milliseconds() as f64 / 1000.0;
            self.station.now() + left_s.max(0.0) * self.clock.scale()
        });
        if walk_in {
            live.dispatch.departure = needs.departure_time;
        }
        let delivered = session.delivered_kwh;
        tracing::debug!(request_id = %id, energy_kwh, ?departure, "the car's charging needs");
        events.extend(
            self.station
                .meter(id, delivered, Some((energy_kwh, departure)))
                .unwrap_or_default(),
        );
        self.apply(events);
        self.stop_if_full(id);
    }

    /// Session `id`'s transaction ended: the car has left, with what its meter says. The
    /// request is completed: delivered when that is its energy, departed otherwise.
    fn on_unplugged(&mut self, id: Uuid) {
        let mut events = self.advanced();
        let ocpp = self.ocpp.as_ref().expect("--chargers ocpp");
        let Some(plug) = ocpp.chargers.plug_of(id) else {
            return;
        };
        let energy = plug.base_kwh + plug.meter_kwh;
        let target = self.sessions.get(&id).map_or(0.0, |l| {
            self.station
                .session(id)
                .map_or(l.dispatch.energy_target_kwh(), |s| {
                    l.prior_kwh + s.energy_kwh
                })
        });
        if let Some((_, removed)) = self.station.remove(id) {
            events.extend(removed);
        }
        self.apply(events);
        let outcome = if energy >= target - FULL_EPSILON_KWH {
            SessionOutcome::Delivered
        } else {
            SessionOutcome::Departed
        };
        tracing::info!(request_id = %id, energy_kwh = energy, outcome = outcome.as_str(), "car unplugged");
        self.finish(id, Utc::now(), outcome, energy);
    }

    /// The load the stations' meters show (kW), counting a station that has not reported
    /// its power at its limit in force.
    pub(super) fn measured_load_kw(&self) -> Option<f64> {
        let ocpp = self.ocpp.as_ref()?;
        let watts: f64 = ocpp
            .chargers
            .plugs()
            .map(|(_, p)| p.power_w.or(p.in_force_w()).unwrap_or(0.0))
            .sum();
        Some(watts / 1000.0)
    }

    /// The stations' gauges: connected, counted at their worst case, and each one's limit
    /// and draw.
    pub(super) fn observe_stations(&self) {
        let Some(ocpp) = &self.ocpp else {
            return;
        };
        let c = &ocpp.chargers;
        self.metrics
            .ocpp_stations_connected
            .set(c.connected() as i64);
        self.metrics
            .ocpp_untrusted_sessions
            .set(c.untrusted() as i64);
        self.metrics.station_limit_watts.reset();
        self.metrics.station_power_watts.reset();
        for (_, plug) in c.plugs() {
            if let Some(limit) = plug.in_force_w() {
                self.metrics
                    .station_limit_watts
                    .with_label_values(&[&plug.station])
                    .set(limit);
            }
            self.metrics
                .station_power_watts
                .with_label_values(&[&plug.station])
                .set(plug.power_w.unwrap_or(0.0));
        }
    }
}
