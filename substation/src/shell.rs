//! The live substation's imperative shell around the pure [`Station`]: the last stage of
//! ingest → dispatcher → **substation**. It takes the assignments on `ev.dispatch.<id>`
//! ([`Feed`]), does with each what [`plan`] says, charges them in the model on the
//! [`SimClock`], and reports through one ordered [`Publisher`]: session events on
//! `ev.sessions.<id>.<event>`, request states in `EV_REQUEST_STATE`, heartbeats on
//! `ev.telemetry.<id>`.
//!
//! A dispatch message stays un-acked while its session lives (progress acks keep it from being
//! redelivered): it is the session's durable record. It is acked only after the completion's
//! writes are acknowledged; a session completes when its energy is delivered or when the car
//! leaves at its departure (`completed`, outcome `departed`, with the energy it got). On shutdown
//! the live sessions record their energy, announce `interrupted` and hand their messages back
//! (nak) to the next substation process, which resumes them from the recorded energy.
//!
//! Grid-operator limits on `ev.limits.<id>` ([`crate::limits`]) change the capacity at run
//! time; heartbeats carry the capacity in force and the sessions' projection
//! ([`Station::projection`]) for the dispatcher's predictive routing.

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream::message::Acker;
use async_nats::jetstream::{self, AckKind, kv};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use evgrid_common::error::chain;
use evgrid_common::streams;
use evgrid_model::charging::{Arrival, Event, EventKind, Snapshot, Station};
use evgrid_model::headers;
use evgrid_model::limits::{InForce, resolve};
use evgrid_model::messages::{
    Limit, RequestRecord, RequestState, SessionEventKind, SessionOutcome,
};

use crate::Config;
use crate::clock::SimClock;
use crate::feed::{Feed, StateRead};
use crate::limits::{self, LimitFeed};
use crate::metrics::Metrics;
use crate::plan::{Facts, Plan, Skip, Stored, Taken, parse_dispatch, plan};
use crate::publisher::Publisher;
use crate::session::{Completion, Ending, Live, Receipt};

mod ocpp;
mod report;
mod state;

pub(crate) use ocpp::Ocpp;

/// Progress acks (and energy checkpoints) go out this often: four per ack wait, so a late tick
/// or a lost ack never lets a live session's message be redelivered, and a crash loses at most
/// this much charging.
const PROGRESS_EVERY: Duration =
    Duration::from_millis(streams::SUBSTATION_ACK_WAIT.as_millis() as u64 / 4);
/// On shutdown, how long to wait for the last writes before giving up on them (their messages
/// are then redelivered after the ack wait, and resumed from the previous record).
pub(crate) const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// A dispatch that cannot be handled now (state unreadable) comes back after this.
const RETRY_DELAY: Duration = Duration::from_secs(1);
/// At start, how long to wait for the stored grid-operator limits before charging.
const LIMITS_REPLAY_TIMEOUT: Duration = Duration::from_secs(5);

/// The live state of one substation: the pure [`Station`] and everything around it that does
/// I/O (the messages it holds, the writes in flight, the heartbeat echo, the limit in force).
pub(crate) struct Shell {
    id: String,
    clock: SimClock,
    station: Station,
    /// Sessions in the model, and sessions whose final writes are in flight.
    sessions: HashMap<Uuid, Live>,
    receipts: FuturesUnordered<Receipt>,
    publisher: Publisher,
    kv: kv::Store,
    metrics: Metrics,
    heartbeat_seq: u64,
    heartbeat_interval_ms: u64,
    /// The `EV_DISPATCH` sequences handled, for the heartbeat's echo.
    taken: Taken,
    /// `--capacity-kw`: the capacity without a grid-operator limit.
    configured_capacity_kw: f64,
    /// The grid-operator limit in force (the configured capacity when there is none).
    limit: InForce,
    /// When the limit in force ends, on the tokio clock.
    limit_end: Option<Instant>,
    /// `EV_LIMITS` sequence of the last limit message handled.
    limit_seq: u64,
    /// The charging stations, with `--chargers ocpp`.
    ocpp: Option<Ocpp>,
    /// The allocation changed since the stations' limits were last worked out: they are, at
    /// the next limit round.
    limits_due: bool,
}

impl Shell {
    pub fn new(
        config: &Config,
        kv: kv::Store,
        publisher: Publisher,
        mut metrics: Metrics,
        ocpp: Option<Ocpp>,
    ) -> Self {
        let station = Station::new(config.capacity_kw, config.allocation, 0.0);
        metrics.observe(&station.snapshot());
        Self {
            id: config.id.clone(),
            clock: SimClock::new(
                Instant::now(),
                Utc::now(),
                config.time_scale,
                SimClock::max_step_for(config.heartbeat_interval),
            ),
            station,
            sessions: HashMap::new(),
            receipts: FuturesUnordered::new(),
            publisher,
            kv,
            metrics,
            heartbeat_seq: 0,
            heartbeat_interval_ms: config.heartbeat_interval.as_millis() as u64,
            taken: Taken::default(),
            configured_capacity_kw: config.capacity_kw,
            limit: InForce::configured(config.capacity_kw),
            limit_end: None,
            limit_seq: 0,
            ocpp,
            limits_due: false,
        }
    }

    /// The capacity in force, kW.
    pub fn capacity_kw(&self) -> f64 {
        self.station.capacity_kw()
    }

    /// Puts the stored grid-operator limit in force before the first car charges: replays the
    /// stored messages of `limit_feed`, for at most [`LIMITS_REPLAY_TIMEOUT`]. False when
    /// `shutdown` came first.
    pub async fn replay_limits(
        &mut self,
        limit_feed: &mut LimitFeed,
        shutdown: &CancellationToken,
    ) -> bool {
        let last = tokio::select! {
            _ = shutdown.cancelled() => return false,
            last = limit_feed.last_seq() => last,
        };
        let last = match last {
            Ok(Some(last)) => last,
            Ok(None) => return true,
            // The limit consumer delivers them shortly.
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the stored grid-operator limits yet");
                return true;
            }
        };
        let mut in_force = None;
        // Bounded: a stored limit an operator purges before it is delivered would otherwise
        // hold the substation back until the next limit.
        let deadline = tokio::time::sleep(LIMITS_REPLAY_TIMEOUT);
        tokio::pin!(deadline);
        while self.limit_seq < last {
            tokio::select! {
                _ = shutdown.cancelled() => return false,
                _ = &mut deadline => {
                    tracing::warn!(last, replayed = self.limit_seq, "stored grid-operator limits not all delivered within {LIMITS_REPLAY_TIMEOUT:?}; charging now, later ones apply as they arrive");
                    break;
                }
                received = limit_feed.next() => {
                    in_force = self.take_limit(received).or(in_force);
                }
            }
        }
        if let Some(in_force) = in_force {
            self.set_limit(in_force);
        }
        true
    }

    /// Charges until `shutdown`: takes dispatches, completes sessions on time (and lets cars
    /// leave at their departure), applies grid-operator limits, heartbeats.
    pub async fn serve(
        &mut self,
        feed: &mut Feed,
        limit_feed: &mut LimitFeed,
        heartbeat: Duration,
        shutdown: &CancellationToken,
    ) {
        let mut heartbeat = tokio::time::interval(heartbeat);
        heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut progress = tokio::time::interval(PROGRESS_EVERY);
        progress.set_missed_tick_behavior(MissedTickBehavior::Delay);
        progress.reset();
        let mut limit_round = tokio::time::interval(ocpp::LIMIT_ROUND);
        limit_round.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            let wake = self
                .station
                .next_event_time()
                .map(|t| self.clock.instant_at(t));
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return,
                Some((id, written)) = self.receipts.next(), if !self.receipts.is_empty() => {
                    self.on_receipt(id, written).await;
                }
                _ = tokio::time::sleep_until(wake.unwrap_or_else(Instant::now)), if wake.is_some() => {
                    // Never stop short of the completion that woke us (float rounding).
                    let due = self.station.next_event_time().unwrap_or(0.0);
                    let now = self.clock.now();
                    self.advance(now.max(due));
                }
                _ = tokio::time::sleep_until(self.limit_end.unwrap_or_else(Instant::now)), if self.limit_end.is_some() => {
                    tracing::info!(capacity_kw = self.configured_capacity_kw, "grid-operator limit ended; back to the configured capacity");
                    self.set_limit(InForce::configured(self.configured_capacity_kw));
                }
                _ = heartbeat.tick() => {
                    self.adopt_unclaimed();
                    self.heartbeat();
                }
                _ = progress.tick() => self.progress().await,
                _ = limit_round.tick(), if self.limits_due => self.send_limits(),
                limit = limit_feed.next() => {
                    if let Some(in_force) = self.take_limit(limit) {
                        self.set_limit(in_force);
                    }
                }
                (msg, state) = feed.next() => self.on_message(msg, state, feed).await,
                Some(event) = ocpp::next_event(&mut self.ocpp) => self.on_station(event),
            }
        }
    }

    /// A message on `ev.limits.<id>`: what it puts in force, or `None` when it is invalid
    /// (logged and counted; the limit in force stays) or already handled (a rebuilt consumer
    /// delivers the stored messages again).
    fn take_limit(&mut self, received: limits::Received) -> Option<InForce> {
        if received.seq != 0 && received.seq <= self.limit_seq {
            return None;
        }
        self.limit_seq = self.limit_seq.max(received.seq);
        match Limit::parse(&received.payload) {
            Ok(limit) => {
                let in_force = resolve(&limit, self.configured_capacity_kw, Utc::now());
                tracing::info!(
                    capacity_kw = in_force.capacity_kw,
                    until = ?in_force.until,
                    seq = received.seq,
                    "grid-operator limit"
                );
                self.metrics.limit_applied.inc();
                Some(in_force)
            }
            Err(e) => {
                tracing::warn!(error = %e, seq = received.seq, "ignoring an invalid grid-operator limit");
                self.metrics.limit_invalid.inc();
                None
            }
        }
    }

    /// Puts `in_force` in force: re-allocates at once (the load never exceeds the new capacity)
    /// and heartbeats, so the dispatcher sees the new capacity without waiting an interval.
    fn set_limit(&mut self, in_force: InForce) {
        self.limit_end = in_force.until.map(|until| {
            let wait = (until - Utc::now()).to_std().unwrap_or_default();
            Instant::now() + wait
        });
        self.limit = in_force;
        self.share_capacity();
        self.heartbeat();
    }

    /// Gives the allocation the capacity in force, less what charging stations' transactions
    /// nobody has claimed yet may draw (`--chargers ocpp`), and reallocates; with stations, their
    /// new limits go out at once rather than at the next limit round.
    fn share_capacity(&mut self) {
        let mut events = self.advanced();
        events.extend(
            self.station
                .set_capacity(self.limit.capacity_kw - self.orphans_kw()),
        );
        self.apply(events);
        self.send_limits();
    }

    /// Brings the model to the clock's now and reports what happened.
    fn advance_now(&mut self) {
        let events = self.advanced();
        self.apply(events);
    }

    /// The numbers the heartbeat and the gauges report: the model's, and with real stations
    /// the load their meters show.
    fn snapshot(&self) -> Snapshot {
        let mut snapshot = self.station.snapshot();
        if let Some(measured) = self.measured_load_kw() {
            snapshot.load_kw = measured;
        }
        snapshot
    }

    /// Brings the model to the clock's now; what happened, for the caller to report with what
    /// it changes next (one [`Self::apply`] per change).
    fn advanced(&mut self) -> Vec<Event> {
        let now = self.clock.now();
        self.station.advance_to(now)
    }

    /// Brings the model to `sim` and reports what happened.
    fn advance(&mut self, sim: f64) {
        let events = self.station.advance_to(sim);
        self.apply(events);
    }

    /// Records that the dispatch at `seq` is handled: in the model, or skipped for good. The
    /// heartbeat echoes it, so the dispatcher stops counting it as in flight.
    fn took_dispatch(&mut self, seq: u64) {
        self.taken.took(seq);
    }

    /// One dispatch message, handled as [`plan`] says. `state`: the request's record in
    /// `EV_REQUEST_STATE`, read when the message was taken.
    async fn on_message(&mut self, msg: jetstream::Message, state: StateRead, feed: &Feed) {
        let (stream_seq, delivery) = match msg.info() {
            Ok(info) => (info.stream_sequence, info.delivered),
            Err(e) => {
                tracing::warn!(subject = %msg.subject, error = %e, "ignoring a message without JetStream metadata");
                return;
            }
        };
        let header_request_id = header(&msg, headers::REQUEST_ID).map(str::to_owned);
        let header_accepted_at = header(&msg, headers::ACCEPTED_AT)
            .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
            .map(|t| t.with_timezone(&Utc));
        let (msg, acker) = msg.split();
        let dispatch = match parse_dispatch(&msg.payload, &self.id) {
            Ok(d) => d,
            Err(problem) => {
                tracing::error!(
                    request_id = header_request_id.as_deref().unwrap_or(""),
                    stream_seq,
                    problem = %chain(&problem),
                    "invalid dispatch message; terminating it"
                );
                ack(&acker, AckKind::Term, "term").await;
                self.took_dispatch(stream_seq);
                return;
            }
        };
        let request_id = dispatch.request_id;
        let held_seq = self.sessions.get(&request_id).map(|live| live.stream_seq);
        // A redelivery's state read ahead may predate the end of its own earlier delivery
        // (acked meanwhile): read it again rather than resume a finished session. Rare path.
        let state = if held_seq.is_none() && delivery > 1 {
            feed.read_now(request_id).await
        } else {
            state
        };
        let (stored, revision, read_error) = match state {
            Ok((record, revision)) => (Stored::Read(record.map(Box::new)), revision, None),
            Err(e) => (Stored::Unreadable, 0, Some(e)),
        };
        let facts = Facts {
            own_id: &self.id,
            stream_seq,
            delivery,
            held_seq,
            now: Utc::now(),
            time_scale: self.clock.scale(),
        };
        match plan(&dispatch, facts, &stored) {
            Plan::KeepHolding => {
                tracing::debug!(%request_id, delivery, "dispatch redelivered; session continues");
                let live = self.sessions.get_mut(&request_id).expect("held here");
                live.acker = Some(acker);
                live.delivery = delivery;
            }
            Plan::Skip(why) => {
                match why {
                    Skip::DuplicateHere => {
                        tracing::debug!(%request_id, stream_seq, "duplicate dispatch of a session here; skipping")
                    }
                    Skip::Finished => {
                        tracing::debug!(%request_id, "request already finished; skipping the dispatch")
                    }
                    Skip::TakenElsewhere => {
                        tracing::warn!(%request_id, "request already taken by another substation; skipping the dispatch")
                    }
                    Skip::MovedAway => {
                        tracing::warn!(%request_id, stream_seq, "request moved away from this dispatch while this substation was out; skipping it")
                    }
                }
                ack(&acker, AckKind::Ack, "ack").await;
                self.took_dispatch(stream_seq);
            }
            Plan::Retry => {
                let error = read_error.map(|e| e.to_string()).unwrap_or_default();
                tracing::warn!(%request_id, %error, "cannot read the request state; retrying the dispatch later");
                self.taken.held_back(stream_seq);
                ack(&acker, AckKind::Nak(Some(RETRY_DELAY)), "nak").await;
            }
            Plan::Accept(accept) => {
                let accepted_at = header_accepted_at.unwrap_or(dispatch.accepted_at);
                let live = Live::new(
                    dispatch,
                    acker,
                    (stream_seq, delivery),
                    &accept,
                    accepted_at,
                    revision,
                );
                self.accept(live, accept.stay_left_s);
            }
        }
    }

    /// Puts a session in the model, announces it, and records its waiting state when it does
    /// not draw power at once.
    fn accept(&mut self, live: Live, stay_left_s: Option<f64>) {
        let request_id = live.dispatch.request_id;
        let prior_kwh = live.prior_kwh;
        self.advance_now();
        let now = self.station.now();
        let car = Arrival {
            id: request_id,
            max_power_kw: live.dispatch.max_power_kw,
            energy_kwh: live.dispatch.energy_target_kwh() - prior_kwh,
            departure: stay_left_s.map(|s| now + s),
        };
        if prior_kwh > 0.0 {
            tracing::debug!(%request_id, prior_kwh, "resuming session");
        } else {
            tracing::debug!(%request_id, "session accepted");
        }
        self.send_event(
            &live,
            SessionEventKind::Accepted,
            Utc::now(),
            prior_kwh,
            None,
        );
        let stream_seq = live.stream_seq;
        self.sessions.insert(request_id, live);
        self.took_dispatch(stream_seq);

        if self.ocpp.is_some() {
            // The car is still to come: it holds its place without power until it plugs in.
            let events = self.station.arrive_pinned(now, car, Some(0.0));
            self.await_car(request_id);
            let live = &self.sessions[&request_id];
            let record = self.record(live, live.waiting_state(), prior_kwh, None);
            self.write_state(record, false);
            self.apply(events);
            return;
        }
        let events = self.station.arrive(now, car);
        if self
            .station
            .session(request_id)
            .is_some_and(|s| !s.is_drawing())
        {
            let live = &self.sessions[&request_id];
            let record = self.record(live, live.waiting_state(), prior_kwh, None);
            self.write_state(record, false);
        }
        self.apply(events);
    }

    /// Reports the model's events: started and completed sessions.
    fn apply(&mut self, events: Vec<Event>) {
        for event in events {
            let at = self.clock.wall_at(event.at);
            match event.kind {
                EventKind::Started => self.on_started(event.id, at),
                EventKind::Completed => {
                    self.on_ended(event, at, SessionOutcome::Delivered);
                }
                EventKind::Departed => self.on_ended(event, at, SessionOutcome::Departed),
            }
        }
        self.metrics.observe(&self.snapshot());
        self.limits_due = self.ocpp.is_some();
    }

    fn on_started(&mut self, id: Uuid, at: DateTime<Utc>) {
        let Some(live) = self.sessions.get_mut(&id) else {
            return;
        };
        if live.charging_started_at.is_none() {
            live.charging_started_at = Some(at);
            let waited = (at - live.accepted_at).num_microseconds().unwrap_or(0) as f64 / 1e6;
            self.metrics
                .accept_to_charging_seconds
                .observe(waited.max(0.0));
        }
        self.metrics.sessions_started.inc();
        tracing::debug!(request_id = %id, "charging");
        let live = &self.sessions[&id];
        self.send_event(live, SessionEventKind::Started, at, live.prior_kwh, None);
        let record = self.record(live, RequestState::Charging, live.prior_kwh, None);
        self.write_state(record, false);
    }

    /// The session ended: its energy is delivered, or the car left at its departure with what
    /// it got. Either way the request is `completed`, with the energy and the outcome.
    fn on_ended(&mut self, event: Event, at: DateTime<Utc>, outcome: SessionOutcome) {
        let Some(live) = self.sessions.get(&event.id) else {
            return;
        };
        let energy = match outcome {
            SessionOutcome::Delivered => live.dispatch.energy_target_kwh(),
            SessionOutcome::Departed => {
                (live.prior_kwh + event.delivered_kwh).min(live.dispatch.energy_target_kwh())
            }
        };
        self.finish(event.id, at, outcome, energy);
    }

    /// Completes session `id` at `at` with `energy` (kWh): records it `completed`, then
    /// announces it, then settles its message.
    fn finish(&mut self, id: Uuid, at: DateTime<Utc>, outcome: SessionOutcome, energy: f64) {
        let Some(live) = self.sessions.get_mut(&id) else {
            return;
        };
        live.ending = Some(Ending::Completed);
        match outcome {
            SessionOutcome::Delivered => self.metrics.sessions_completed.inc(),
            SessionOutcome::Departed => self.metrics.sessions_departed.inc(),
        }
        if let Some(ocpp) = &mut self.ocpp {
            ocpp.forget(id);
        }
        let live = &self.sessions[&id];
        tracing::debug!(
            request_id = %id,
            energy_kwh = live.dispatch.energy_kwh,
            energy_delivered_kwh = energy,
            outcome = outcome.as_str(),
            "session completed"
        );
        let record = RequestRecord {
            reason: Some(outcome.as_str().to_owned()),
            ..self.record(live, RequestState::Completed, energy, Some(at))
        };
        self.sessions.get_mut(&id).expect("live").completion = Some(Completion {
            at,
            energy_kwh: energy,
            outcome,
        });
        // Then the `completed` event; the message is acked once both are durable.
        self.write_state(record, true);
    }

    /// Keeps every held message from being redelivered, and records the energy of sessions that
    /// draw power, so a crash loses at most one progress interval of charging.
    async fn progress(&mut self) {
        self.advance_now();
        for live in self.sessions.values() {
            ack_held(live, AckKind::Progress, "progress").await;
        }
        let mut checkpoints = Vec::new();
        for s in self.station.sessions().iter().filter(|s| s.is_drawing()) {
            if let Some(live) = self.sessions.get(&s.id) {
                let delivered = live.prior_kwh + s.delivered_kwh;
                checkpoints.push(self.record(live, RequestState::Charging, delivered, None));
            }
        }
        for record in checkpoints {
            self.write_state(record, false);
        }
    }

    /// Shutdown: stop pulling, record and announce every live session as interrupted, hand
    /// their messages back once that is durable, and finish the completions in flight.
    pub async fn stop(&mut self, feed: Feed) {
        for msg in feed.close().await {
            let held = msg.info().ok().is_some_and(|info| {
                self.sessions
                    .values()
                    .any(|l| l.stream_seq == info.stream_sequence)
            });
            // Never hand back a live session's message before its interruption is recorded.
            if !held && let Err(e) = msg.ack_with(AckKind::Nak(None)).await {
                tracing::warn!(error = %e, "cannot hand back an unread dispatch");
            }
        }
        self.advance_now();
        let at = Utc::now();
        let mut interrupted = Vec::new();
        for s in self.station.sessions() {
            let Some(live) = self.sessions.get(&s.id) else {
                continue;
            };
            let delivered = live.prior_kwh + s.delivered_kwh;
            let state = if s.is_drawing() {
                RequestState::Charging
            } else {
                live.waiting_state()
            };
            interrupted.push((s.id, delivered, state));
        }
        for (id, delivered, state) in interrupted {
            let live = self.sessions.get_mut(&id).expect("live session");
            live.ending = Some(Ending::Interrupted);
            let live = &self.sessions[&id];
            tracing::debug!(request_id = %id, energy_delivered_kwh = delivered, "session interrupted by shutdown");
            self.metrics.sessions_interrupted.inc();
            self.send_event(live, SessionEventKind::Interrupted, at, delivered, None);
            self.write_state(self.record(live, state, delivered, None), true);
        }
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        while !self.receipts.is_empty() {
            match tokio::time::timeout_at(deadline, self.receipts.next()).await {
                Ok(Some((id, written))) => self.on_receipt(id, written).await,
                Ok(None) => break,
                Err(_) => {
                    tracing::warn!(
                        sessions = self.receipts.len(),
                        "final writes not acknowledged in time; those messages are redelivered after the ack wait"
                    );
                    break;
                }
            }
        }
    }
}

fn header<'a>(msg: &'a jetstream::Message, name: &str) -> Option<&'a str> {
    msg.headers.as_ref()?.get(name).map(|v| v.as_str())
}

/// [`ack`] of a session's message, when it has one (a walk-in has none).
async fn ack_held(live: &Live, kind: AckKind, what: &'static str) {
    if let Some(acker) = &live.acker {
        ack(acker, kind, what).await;
    }
}

async fn ack(acker: &Acker, kind: AckKind, what: &'static str) {
    if let Err(e) = acker.ack_with(kind).await {
        // The server redelivers what it did not hear about; the handling is idempotent.
        tracing::warn!(error = %e, "cannot send {what} for a dispatch message");
    }
}
