//! What the live substation reports, all through its one ordered [`Publisher`]: session events
//! on `ev.sessions.<id>.<event>`, heartbeats on `ev.telemetry.<id>` (the load, the projection
//! and the limit in force, for the dispatcher), and the records its request states are written
//! from ([`super::state`] writes them).

use async_nats::jetstream::message::PublishMessage;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use evgrid_model::messages::{
    ChargerSession, Heartbeat, RequestRecord, RequestState, SessionEvent, SessionEventKind,
    SessionOutcome, SessionReport, Telemetry,
};
use evgrid_model::{headers, subjects};

use super::Shell;
use crate::publisher::Write;
use crate::session::Live;

impl Shell {
    /// Publishes the state now, with the projection for predictive routing and the limit in
    /// force.
    pub(super) fn heartbeat(&mut self) {
        self.advance_now();
        let s = self.snapshot();
        self.observe_stations();
        self.heartbeat_seq += 1;
        let heartbeat = Heartbeat {
            substation_id: self.id.clone(),
            seq: self.heartbeat_seq,
            sent_at: Utc::now(),
            capacity_kw: s.capacity_kw,
            load_kw: s.load_kw,
            active_sessions: s.active,
            queued_sessions: s.queued,
            demand_kw: s.demand_kw,
            dispatch_seq: self.taken.echo(),
            interval_ms: self.heartbeat_interval_ms,
        };
        let limited = self.limit.capacity_kw != self.configured_capacity_kw;
        let telemetry = Telemetry {
            heartbeat,
            projection: Some(self.station.projection()),
            configured_capacity_kw: limited.then_some(self.configured_capacity_kw),
            limit_until: self.limit.until,
        };
        self.publisher.send(Write::new(
            subjects::telemetry(&self.id),
            PublishMessage::build().payload(json(&telemetry)),
        ));
    }

    pub(super) fn record(
        &self,
        live: &Live,
        state: RequestState,
        delivered_kwh: f64,
        completed_at: Option<DateTime<Utc>>,
    ) -> RequestRecord {
        let id = live.dispatch.request_id;
        let charger = self
            .ocpp
            .as_ref()
            .and_then(|ocpp| ocpp.chargers.plug_of(id))
            .map(|plug| ChargerSession {
                station_id: plug.station.clone(),
                transaction_id: plug.transaction_id.clone(),
                energy_before_kwh: plug.base_kwh,
            });
        RequestRecord {
            // The dispatch names the substation that took it: this one (the plan skips others').
            substation_id: Some(self.id.clone()),
            charger,
            energy_delivered_kwh: delivered_kwh,
            charging_started_at: live.charging_started_at,
            completed_at,
            moved: live.moved.clone(),
            ..RequestRecord::of_dispatch(&live.dispatch, state, Utc::now())
        }
    }

    pub(super) fn send_event(
        &self,
        live: &Live,
        kind: SessionEventKind,
        at: DateTime<Utc>,
        delivered_kwh: f64,
        outcome: Option<SessionOutcome>,
    ) {
        self.publisher
            .send(self.event_write(live, kind, at, delivered_kwh, outcome));
    }

    /// The write of one session event on `ev.sessions.<id>.<event>`.
    pub(super) fn event_write(
        &self,
        live: &Live,
        kind: SessionEventKind,
        at: DateTime<Utc>,
        delivered_kwh: f64,
        outcome: Option<SessionOutcome>,
    ) -> Write {
        let d = &live.dispatch;
        let event = SessionEvent {
            event: kind,
            request_id: d.request_id,
            substation_id: self.id.clone(),
            vehicle_id: d.vehicle_id.clone(),
            at,
            energy_kwh: d.energy_kwh,
            energy_delivered_kwh: delivered_kwh,
            accepted_at: d.accepted_at,
            dispatched_at: d.dispatched_at,
        };
        // One id per event of one delivery: a retried publish is stored once, while a resumed
        // session (a new delivery) announces itself again.
        let msg_id = format!(
            "{}.{}.{}.{}",
            d.request_id,
            kind.as_str(),
            live.stream_seq,
            live.delivery
        );
        let message = PublishMessage::build()
            .payload(json(&SessionReport { event, outcome }))
            .message_id(msg_id)
            .header(headers::REQUEST_ID, d.request_id.to_string())
            .header(headers::ACCEPTED_AT, live.accepted_at.to_rfc3339());
        Write::new(subjects::sessions(&self.id, kind.as_str()), message)
    }
}

fn json<T: serde::Serialize>(value: &T) -> Bytes {
    Bytes::from(serde_json::to_vec(value).expect("message types serialize"))
}
