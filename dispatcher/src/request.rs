//! One request message of `ev.requests`, from delivery to ack: the middle step of
//! ingest → **dispatcher** → substation (docs/architecture.md, "Dispatcher, per request message").
//!
//! [`Handler::handle`] runs in the consumer loop, one message at a time: it validates, resolves
//! the request id, takes the [`decide`] decision under the grid lock and records the pending
//! assignment, so the next decision already counts it. It returns the future that carries the
//! decision out (publish, await the PubAck, write the state, then ack, nak or term); the loop runs
//! many of those at once.

use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::context::PublishError;
use async_nats::jetstream::kv::{self, CreateErrorKind, UpdateErrorKind};
use async_nats::jetstream::message::{Message, PublishMessage};
use async_nats::jetstream::publish::PublishAck;
use async_nats::jetstream::{self, AckKind};
use chrono::{DateTime, Utc};
use evgrid_common::error::chain;
use evgrid_common::streams;
use evgrid_model::headers;
use evgrid_model::messages::{
    ChargeRequest, Dispatch, Move, RejectReason, RequestRecord, RequestState, SessionEvent,
    SessionEventKind, SessionReport, request_id_from_sequence, session_state_key,
};
use evgrid_model::subjects;
use evgrid_model::validate::{RequestError, parse_charge_request};
use futures::future::Either;
use rand::rngs::SmallRng;
use tracing::Instrument;
use uuid::Uuid;

use crate::metrics::{MOVED_CHARGING, MOVED_DISPATCHED, Metrics, NO_SUBSTATION, outcome};
use evgrid_model::decision::{Decision, DeferReason, Demand, GridView, Policy, Ticket, decide};

/// Compare-and-set attempts of one move before it is retried later.
const TAKE_OVER_ATTEMPTS: usize = 5;

/// Longest `Evgrid-Reject-Detail` header: enough for every field error of a request.
const MAX_DETAIL_BYTES: usize = 1024;
/// Deliveries of a request whose rejection copy the server refuses (not a timeout or a lost
/// connection: those are retried for ever) before it is terminated without one.
pub(crate) const REJECT_ATTEMPTS: i64 = 5;

/// Everything a request message needs, shared by the consumer loop and the in-flight work.
#[derive(Debug)]
pub(crate) struct Handler {
    pub js: jetstream::Context,
    pub kv: kv::Store,
    pub grid: Arc<Mutex<GridView>>,
    pub metrics: Arc<Metrics>,
    pub policy: Policy,
    /// The only randomness of a decision (the `p2c` policy), seeded at start.
    pub rng: Mutex<SmallRng>,
    pub defer_delay: Duration,
    /// This process among the dispatcher replicas (a UUID), on every dispatch it sends.
    pub instance: Arc<str>,
}

/// Where a message sits in `EV_REQUESTS`.
#[derive(Debug, Clone, Copy)]
struct Delivery {
    stream_seq: u64,
    /// 1 on the first delivery.
    delivered: i64,
    stored_at: DateTime<Utc>,
}

/// A request being moved away from a failed substation (failover), taken over by
/// [`Handler::take_over`].
#[derive(Debug, Clone)]
struct Moving {
    /// `EV_DISPATCH` sequence of the dispatch it moves from.
    move_of: u64,
    /// Energy delivered before the move: only the rest is asked of the next substation.
    prior_kwh: f64,
}

/// What the decision asks for, carried out by [`Handler::execute`].
#[derive(Debug)]
enum Action {
    Dispatch {
        dispatch: Dispatch,
        ticket: Ticket,
        /// `Nats-Msg-Id` of the dispatch: `dispatch-<request id>`, and for a move
        /// `dispatch-<request id>-after-<seq of the dispatch it moves from>`.
        msg_id: String,
        /// The power counted for it until the substation's heartbeat shows it.
        power_kw: f64,
    },
    Defer {
        reason: DeferReason,
        /// `queued` state, written on the first deferral only.
        queued: Option<RequestRecord>,
    },
    Reject {
        reason: RejectReason,
        detail: String,
        /// `rejected` state, when the fields parsed (there is a vehicle and an energy to show).
        record: Option<RequestRecord>,
    },
}

impl Action {
    /// Dispatching and rejecting settle a request for good: on a redelivery they are taken only
    /// after checking that no earlier delivery did already. A rejection without a record (the
    /// payload's fields did not parse) has no state to check and is the same every time.
    fn settles_for_good(&self) -> bool {
        match self {
            Action::Dispatch { .. } => true,
            Action::Reject { record, .. } => record.is_some(),
            Action::Defer { .. } => false,
        }
    }
}

/// Writes `value` under `key` if its revision is still `revision` (0: no record yet). `false`:
/// refused, the record moved on.
async fn compare_and_set(
    kv: &kv::Store,
    key: &str,
    value: bytes::Bytes,
    revision: u64,
) -> Result<bool, async_nats::Error> {
    if revision == 0 {
        return match kv.create(key, value).await {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == CreateErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(e.into()),
        };
    }
    match kv.update(key, value, revision).await {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Locks the grid; a panic elsewhere while holding it cannot leave it half-updated (every
/// mutation is a single call), so a poisoned lock is still usable.
pub(crate) fn lock(grid: &Mutex<GridView>) -> MutexGuard<'_, GridView> {
    grid.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Handler {
    /// Decides what happens to `msg` and returns the work that does it and settles the message,
    /// inside a span carrying the request id. `None` for a message that is not a JetStream
    /// delivery (nothing can be done with it, not even an ack).
    pub(crate) fn handle(
        self: &Arc<Self>,
        msg: Message,
    ) -> Option<impl Future<Output = ()> + Send + 'static> {
        let delivery = match msg.info() {
            Ok(info) => Delivery {
                stream_seq: info.stream_sequence,
                delivered: info.delivered,
                stored_at: evgrid_common::nats::to_utc(info.published),
            },
            Err(e) => {
                tracing::warn!(subject = %msg.subject, error = %e, "ignoring a message without JetStream metadata");
                return None;
            }
        };
        if let Some(from) = header(msg.headers.as_ref(), headers::MOVED_FROM) {
            let from = from.to_owned();
            let span = tracing::debug_span!("move", %from, seq = delivery.stream_seq);
            return Some(Either::Left(
                Arc::clone(self)
                    .execute_move(msg, delivery, from)
                    .instrument(span),
            ));
        }
        let (request_id, action) = self.plan(&msg, delivery, Utc::now(), None);
        // A debug span: creating an enabled span formats its fields, a measurable share of
        // the dispatcher's CPU per request (docs/benchmarks.md). Lines at info and above name
        // the request themselves.
        let span = tracing::debug_span!(
            "request",
            %request_id,
            seq = delivery.stream_seq,
            delivered = delivery.delivered
        );
        Some(Either::Right(
            Arc::clone(self)
                .execute(msg, delivery, request_id, action)
                .instrument(span),
        ))
    }

    /// A move offer (`failover`): takes the request over from the failed substation, then
    /// places it like any request, asking only for the energy it has not had yet. Nothing
    /// happens when it finished, moved already or its substation came back.
    async fn execute_move(self: Arc<Self>, msg: Message, d: Delivery, from: String) {
        let request_id = header(msg.headers.as_ref(), headers::REQUEST_ID)
            .and_then(|v| Uuid::parse_str(v.trim()).ok())
            .or_else(|| body_request_id(&msg.payload));
        let move_of = header(msg.headers.as_ref(), headers::MOVE_OF)
            .and_then(|v| v.trim().parse::<u64>().ok());
        let (Some(request_id), Some(move_of)) = (request_id, move_of) else {
            tracing::warn!(%from, "a move offer without its request id or dispatch sequence; dropping it");
            settle(&msg, request_id.unwrap_or_default(), AckKind::Term).await;
            return;
        };
        match self.take_over(request_id, &from, move_of).await {
            Ok(Some(prior_kwh)) => {
                let moving = Moving { move_of, prior_kwh };
                let (request_id, action) = self.plan(&msg, d, Utc::now(), Some(&moving));
                self.execute(msg, d, request_id, action).await;
            }
            Ok(None) => {
                tracing::debug!(%request_id, %from, "nothing to move");
                settle(&msg, request_id, AckKind::Ack).await;
            }
            Err(e) => {
                tracing::warn!(%request_id, %from, error = %e, "cannot move the request yet; retrying later");
                settle(&msg, request_id, AckKind::Nak(Some(self.defer_delay))).await;
            }
        }
    }

    /// Takes `request_id` over from the failed substation `from`: `queued` again, with the move
    /// in its history and the energy it got kept. Returns the energy delivered so far when the
    /// request is to be placed again (also when an earlier delivery of this offer took it over
    /// already), `None` when there is nothing to move: it is finished, elsewhere, or `from` is
    /// up again.
    ///
    /// Two compare-and-set writes, in this order: the fence over `from`'s session record
    /// (`<request id>.<from>`: its next write then finds another revision, reads the fence and
    /// stops charging), then the request's own record. A take-over cut between the two (a
    /// crash, or another dispatcher's offer) finds the fence of this very move and finishes it.
    async fn take_over(
        &self,
        request_id: Uuid,
        from: &str,
        move_of: u64,
    ) -> Result<Option<f64>, async_nats::Error> {
        let key = request_id.to_string();
        let session_key = session_state_key(request_id, from);
        let is_this_move = |r: &RequestRecord| {
            r.moved
                .last()
                .is_some_and(|m| m.substation_id == from && m.dispatch_seq == move_of)
        };
        // Each lost compare-and-set means the state moved on: look again.
        for _ in 0..TAKE_OVER_ATTEMPTS {
            let (Some(record), revision) = streams::read_state(&self.kv, &key).await? else {
                return Ok(None);
            };
            if record.state == RequestState::Queued {
                return Ok(is_this_move(&record).then_some(record.energy_delivered_kwh));
            }
            if record.state.is_final() || record.substation_id.as_deref() != Some(from) {
                return Ok(None);
            }
            let (session, session_revision) = streams::read_state(&self.kv, &session_key).await?;
            if let Some(fence) = session.as_ref().filter(|s| is_this_move(s)) {
                // Fenced by an earlier try of this move: record it as the request's state too.
                if compare_and_set(&self.kv, &key, to_json(fence), revision).await? {
                    return Ok(Some(fence.energy_delivered_kwh));
                }
                continue;
            }
            let current = RequestRecord::merged(Some(record), session).expect("a record to merge");
            if current.state.is_final() {
                return Ok(None);
            }
            let now = Utc::now();
            let silent_s = match lock(&self.grid).get(from) {
                Some(s) if s.is_up(now) => return Ok(None),
                Some(s) => s.observed().age_seconds(now),
                None => f64::INFINITY,
            };
            let mut moved = current.moved.clone();
            moved.push(Move {
                substation_id: from.to_owned(),
                dispatch_seq: move_of,
                state: current.state,
                energy_delivered_kwh: current.energy_delivered_kwh,
                moved_at: now,
                reason: format!("no heartbeat from {from} for {silent_s:.1} s"),
            });
            let queued = to_json(&RequestRecord {
                state: RequestState::Queued,
                substation_id: None,
                dispatched_at: None,
                reason: Some(format!("moved from {from}")),
                updated_at: now,
                moved,
                ..current.clone()
            });
            // The fence first, then the request's own record; either refused, look again (a
            // checkpoint of `from` landed, or another dispatcher moved it meanwhile).
            if !compare_and_set(&self.kv, &session_key, queued.clone(), session_revision).await?
                || !compare_and_set(&self.kv, &key, queued, revision).await?
            {
                continue;
            }
            self.announce_move(&current, from, revision, now).await;
            return Ok(Some(current.energy_delivered_kwh));
        }
        Err(format!("the state of {request_id} kept changing while it was moved").into())
    }

    /// Counts and logs a move, and for a session that was charging publishes its `interrupted`
    /// event on the failed substation's behalf, with the energy it got there.
    async fn announce_move(
        &self,
        was: &RequestRecord,
        from: &str,
        revision: u64,
        at: DateTime<Utc>,
    ) {
        let state = if was.state == RequestState::Charging {
            MOVED_CHARGING
        } else {
            MOVED_DISPATCHED
        };
        self.metrics.moved.with_label_values(&[from, state]).inc();
        tracing::info!(request_id = %was.request_id, %from, state, energy_delivered_kwh = was.energy_delivered_kwh, "moving the request away from a failed substation");
        if was.state != RequestState::Charging {
            return;
        }
        let event = SessionReport {
            event: SessionEvent {
                event: SessionEventKind::Interrupted,
                request_id: was.request_id,
                substation_id: from.to_owned(),
                vehicle_id: was.vehicle_id.clone(),
                at,
                energy_kwh: was.energy_kwh,
                energy_delivered_kwh: was.energy_delivered_kwh,
                accepted_at: was.accepted_at,
                dispatched_at: was.dispatched_at.unwrap_or(was.accepted_at),
            },
            outcome: None,
        };
        let publish = PublishMessage::build()
            .payload(
                serde_json::to_vec(&event)
                    .expect("a SessionReport serializes")
                    .into(),
            )
            .message_id(format!("moved-{}-{revision}", was.request_id))
            .header(headers::REQUEST_ID, was.request_id.to_string())
            .header(headers::ACCEPTED_AT, was.accepted_at.to_rfc3339());
        let subject = subjects::sessions(from, SessionEventKind::Interrupted.as_str());
        // Informative: the move is recorded in the state whether or not this is stored.
        if let Err(e) = self.publish(subject, publish).await {
            tracing::warn!(request_id = %was.request_id, error = %e, "cannot publish the interrupted event of a moved session");
        }
    }

    /// Validation, request id and decision; the pending assignment is recorded before this
    /// returns.
    fn plan(
        &self,
        msg: &Message,
        d: Delivery,
        now: DateTime<Utc>,
        moving: Option<&Moving>,
    ) -> (Uuid, Action) {
        let header_id = header(msg.headers.as_ref(), headers::REQUEST_ID)
            .and_then(|v| Uuid::parse_str(v.trim()).ok());
        let fallback_id = header_id.unwrap_or_else(|| request_id_from_sequence(d.stream_seq));
        let accepted_at = header(msg.headers.as_ref(), headers::ACCEPTED_AT)
            .and_then(|v| DateTime::parse_from_rfc3339(v.trim()).ok())
            .map_or(d.stored_at, |t| t.to_utc());

        let request = match parse_charge_request(&msg.payload, now) {
            Ok(request) => request,
            Err(err) => return self.invalid(&msg.payload, err, fallback_id, accepted_at, now),
        };
        let request_id = request.request_id.unwrap_or(fallback_id);

        let mut demand = Demand::from(&request);
        let prior_kwh = moving.map_or(0.0, |m| m.prior_kwh);
        if moving.is_some() {
            // Only what it has not had yet; never nothing, or it would count as no demand.
            demand.energy_kwh = (request.energy_kwh - prior_kwh).max(f64::EPSILON);
        }
        // Best effort: a car leaving before its energy fits is charged what it can take, as a
        // real charger would, unless the request asked for all or nothing. Nearly nothing is
        // still nothing: `decide` rejects it as undeliverable.
        let expected_kwh = if request.all_or_nothing {
            None
        } else {
            demand.cut_to_what_fits(now)
        };
        let (decision, ticket) = {
            let mut grid = lock(&self.grid);
            let mut rng = self.rng.lock().unwrap_or_else(|p| p.into_inner());
            let started = Instant::now();
            let decision = decide(&grid, &demand, now, self.policy, &mut *rng);
            self.metrics
                .decision_duration
                .observe(started.elapsed().as_secs_f64());
            let ticket = match &decision {
                Decision::Dispatch {
                    substation_id,
                    power_kw,
                } => grid.assign(substation_id, *power_kw, &demand),
                _ => None,
            };
            (decision, ticket)
        };

        let action = match (decision, ticket) {
            (
                Decision::Dispatch {
                    substation_id,
                    power_kw,
                },
                Some(ticket),
            ) => {
                self.metrics.decided(&substation_id, outcome::DISPATCHED);
                Action::Dispatch {
                    dispatch: Dispatch {
                        request_id,
                        substation_id: substation_id.to_string(),
                        vehicle_id: request.vehicle_id,
                        energy_kwh: request.energy_kwh,
                        energy_expected_kwh: expected_kwh.map(|_| prior_kwh + demand.energy_kwh),
                        max_power_kw: request.max_power_kw,
                        departure: request.departure,
                        accepted_at,
                        dispatched_at: now,
                        request_seq: d.stream_seq,
                    },
                    ticket,
                    msg_id: match moving {
                        Some(m) => format!("dispatch-{request_id}-after-{}", m.move_of),
                        None => format!("dispatch-{request_id}"),
                    },
                    power_kw,
                }
            }
            (Decision::Reject { reason, detail }, _) => {
                self.metrics.decided(NO_SUBSTATION, outcome::REJECTED);
                let record = rejected_record(&request, request_id, reason, accepted_at, now);
                Action::Reject {
                    reason,
                    detail,
                    record: Some(record),
                }
            }
            (Decision::Defer { reason }, _) => {
                self.metrics.decided(NO_SUBSTATION, outcome::DEFERRED);
                Action::Defer {
                    reason,
                    queued: (d.delivered <= 1).then(|| {
                        RequestRecord::new(
                            request_id,
                            RequestState::Queued,
                            &request,
                            accepted_at,
                            now,
                        )
                    }),
                }
            }
            // `decide` only names substations of the grid it was given, under the same lock.
            (Decision::Dispatch { .. }, None) => unreachable!("dispatch to an unknown substation"),
        };
        (request_id, action)
    }

    /// The payload breaks the contract: it is rejected with the reason the validation gives.
    fn invalid(
        &self,
        payload: &[u8],
        err: RequestError,
        fallback_id: Uuid,
        accepted_at: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> (Uuid, Action) {
        let (reason, request_id, record) = match &err {
            RequestError::Malformed(_) => (RejectReason::NotJson, fallback_id, None),
            e if e.is_departure_passed() => {
                // Every other field is valid: parsing as of just before the departure yields
                // them (the departure is then ahead, and within the longest stay), so the
                // rejection can be recorded in full.
                let before =
                    body_departure(payload).map(|t| t - chrono::TimeDelta::milliseconds(1));
                match before
                    .map(|t| parse_charge_request(payload, t))
                    .unwrap_or(Err(err.clone()))
                {
                    Ok(r) => {
                        let id = r.request_id.unwrap_or(fallback_id);
                        let reason = RejectReason::DeparturePassed;
                        let record = rejected_record(&r, id, reason, accepted_at, now);
                        (reason, id, Some(record))
                    }
                    Err(_) => (RejectReason::DeparturePassed, fallback_id, None),
                }
            }
            RequestError::Invalid(_) => (
                RejectReason::InvalidFields,
                body_request_id(payload).unwrap_or(fallback_id),
                None,
            ),
        };
        self.metrics.decided(NO_SUBSTATION, outcome::REJECTED);
        let action = Action::Reject {
            reason,
            detail: err.to_string(),
            record,
        };
        (request_id, action)
    }

    async fn execute(self: Arc<Self>, msg: Message, d: Delivery, request_id: Uuid, action: Action) {
        if d.delivered > 1 && action.settles_for_good() {
            // Boxed, like the other rare paths below: every request's future is allocated at
            // the size of its largest path (docs/benchmarks.md).
            let settled = match Box::pin(self.handled_before(request_id)).await {
                Ok(None) => None,
                // An earlier delivery was dispatched or rejected, and only its ack was lost (a
                // PubAck timeout, a crash before the ack): deciding again could reject a car
                // that is charging, or, past the dedupe window, send it to a second substation.
                Ok(Some(state)) => {
                    tracing::debug!(%request_id, state = ?state, "handled by an earlier delivery; acking this one");
                    Some(AckKind::Ack)
                }
                Err(e) => {
                    tracing::warn!(%request_id, error = %e, "cannot read the request state; retrying later");
                    Some(AckKind::Nak(Some(self.defer_delay)))
                }
            };
            if let Some(kind) = settled {
                if let Action::Dispatch { ticket, .. } = &action {
                    lock(&self.grid).cancel(ticket);
                }
                settle(&msg, request_id, kind).await;
                return;
            }
        }
        match action {
            Action::Dispatch {
                dispatch,
                ticket,
                msg_id,
                power_kw,
            } => self.dispatch(msg, dispatch, ticket, msg_id, power_kw).await,
            Action::Defer { reason, queued } => {
                Box::pin(self.defer(msg, request_id, reason, queued)).await
            }
            Action::Reject {
                reason,
                detail,
                record,
            } => Box::pin(self.reject(msg, d, request_id, reason, &detail, record)).await,
        }
    }

    /// The request's stored state when it is past `queued`: an earlier delivery of it was
    /// dispatched (the substation that took it recorded it) or rejected.
    async fn handled_before(
        &self,
        request_id: Uuid,
    ) -> Result<Option<RequestState>, kv::EntryError> {
        let (record, _) = streams::read_state(&self.kv, &request_id.to_string()).await?;
        Ok(record
            .map(|record| record.state)
            .filter(|state| *state != RequestState::Queued))
    }

    /// Publishes the assignment (deduplicated by request id), then acks the request.
    async fn dispatch(
        &self,
        msg: Message,
        dispatch: Dispatch,
        ticket: Ticket,
        msg_id: String,
        power_kw: f64,
    ) {
        let request_id = dispatch.request_id;
        let substation = dispatch.substation_id.clone();
        let publish = PublishMessage::build()
            .payload(
                serde_json::to_vec(&dispatch)
                    .expect("a Dispatch serializes")
                    .into(),
            )
            .message_id(msg_id)
            .header(headers::DISPATCHER, &*self.instance)
            .header(headers::POWER_KW, power_kw.to_string())
            .header(headers::REQUEST_ID, dispatch.request_id.to_string())
            .header(headers::ACCEPTED_AT, dispatch.accepted_at.to_rfc3339());
        match self.publish(subjects::dispatch(&substation), publish).await {
            Ok(ack) => {
                {
                    let mut grid = lock(&self.grid);
                    if ack.duplicate {
                        // Dispatched before (a redelivery, or the same request id twice): that
                        // assignment was counted then.
                        grid.cancel(&ticket);
                    } else {
                        grid.confirm(&ticket, ack.sequence);
                    }
                }
                tracing::debug!(
                    %substation,
                    dispatch_seq = ack.sequence,
                    duplicate = ack.duplicate,
                    "dispatched"
                );
                // A duplicate went where the earlier delivery sent it, not where this one
                // decided: the stored dispatch says where (rare path).
                let recorded = if ack.duplicate {
                    Box::pin(self.record_stored_dispatch(ack.sequence)).await
                } else {
                    self.record_dispatched(&dispatch).await
                };
                match recorded {
                    Ok(()) => settle(&msg, request_id, AckKind::Ack).await,
                    Err(e) => {
                        // The dispatch is stored; the redelivery finds it deduplicated and
                        // records it then.
                        tracing::warn!(%request_id, %substation, error = %chain(&*e), "cannot record the dispatched state; retrying later");
                        settle(&msg, request_id, AckKind::Nak(Some(self.defer_delay))).await;
                    }
                }
            }
            Err(e) => {
                lock(&self.grid).cancel(&ticket);
                tracing::warn!(%request_id, %substation, error = %e, "dispatch not stored; the request is offered again later");
                settle(&msg, request_id, AckKind::Nak(Some(self.defer_delay))).await;
            }
        }
    }

    /// Records `dispatched` at the substation of `dispatch` in the request's own record, so
    /// `GET` says where the request went from the moment it is sent (the substation records its
    /// session under its own key), without ever moving a state backwards: created when the
    /// request has no state yet, written over `queued` only by compare-and-set on its revision,
    /// and left alone otherwise (an earlier delivery dispatched it already).
    async fn record_dispatched(&self, dispatch: &Dispatch) -> Result<(), async_nats::Error> {
        let key = dispatch.request_id.to_string();
        let value = to_json(&RequestRecord::of_dispatch(
            dispatch,
            RequestState::Dispatched,
            Utc::now(),
        ));
        let Some(entry) = self.create_or_latest(&key, value.clone()).await? else {
            return Ok(());
        };
        let current = serde_json::from_slice::<RequestRecord>(&entry.value).ok();
        if current
            .as_ref()
            .is_some_and(|r| r.state != RequestState::Queued)
        {
            return Ok(());
        }
        // A moved request keeps its history and the energy it got before.
        let value = match current {
            Some(queued) if !queued.moved.is_empty() => to_json(&RequestRecord {
                energy_delivered_kwh: queued.energy_delivered_kwh,
                charging_started_at: queued.charging_started_at,
                moved: queued.moved,
                ..RequestRecord::of_dispatch(dispatch, RequestState::Dispatched, Utc::now())
            }),
            _ => value,
        };
        // Refused: written meanwhile, by another delivery of it, as late as this one.
        compare_and_set(&self.kv, &key, value, entry.revision).await?;
        Ok(())
    }

    /// Records `rejected` without ever moving a state backwards, like
    /// [`Self::record_dispatched`]: created when the request has no state yet, written over
    /// `queued` only by compare-and-set on its revision, and left alone otherwise. A message
    /// that reuses the id of a request dispatched, charging or finished (a client resending
    /// after the dedupe window, or someone guessing ids) is rejected in `ev.rejected` but never
    /// overwrites that request's record.
    async fn record_rejected(&self, record: &RequestRecord) -> Result<(), async_nats::Error> {
        let key = record.request_id.to_string();
        let value = to_json(record);
        let Some(entry) = self.create_or_latest(&key, value.clone()).await? else {
            return Ok(());
        };
        let queued = entry.operation == kv::Operation::Put
            && serde_json::from_slice::<RequestRecord>(&entry.value)
                .is_ok_and(|r| r.state == RequestState::Queued);
        if !queued {
            tracing::warn!(request_id = %record.request_id, "a rejected message reuses the id of a request past queued; its record stays");
            return Ok(());
        }
        // Refused: written meanwhile, by a dispatch of it, a later state.
        compare_and_set(&self.kv, &key, value, entry.revision).await?;
        Ok(())
    }

    /// Creates `key`'s record as `value`; when it exists already, its latest entry (read from
    /// the leader) for a compare-and-set. `None`: created (or gone meanwhile).
    async fn create_or_latest(
        &self,
        key: &str,
        value: bytes::Bytes,
    ) -> Result<Option<kv::Entry>, async_nats::Error> {
        if compare_and_set(&self.kv, key, value, 0).await? {
            Ok(None)
        } else {
            Ok(streams::read_latest(&self.kv, key).await?)
        }
    }

    /// [`Self::record_dispatched`] for the dispatch stored at `seq` in `EV_DISPATCH`.
    async fn record_stored_dispatch(&self, seq: u64) -> Result<(), async_nats::Error> {
        let stream = self.js.get_stream_no_info(streams::DISPATCH).await?;
        let stored = stream.direct_get(seq).await?;
        let dispatch: Dispatch = serde_json::from_slice(&stored.payload)?;
        self.record_dispatched(&dispatch).await
    }

    /// The request waits in the stream: nak with a delay, never drop.
    async fn defer(
        &self,
        msg: Message,
        request_id: Uuid,
        reason: DeferReason,
        queued: Option<RequestRecord>,
    ) {
        if let Some(record) = queued {
            let key = record.request_id.to_string();
            // `create`, not `put`: queued is the first state, and whatever is there already
            // (ingest's queued, or a later state of the same request id) must stay.
            if let Err(e) = compare_and_set(&self.kv, &key, to_json(&record), 0).await {
                tracing::warn!(%request_id, error = %e, "cannot record the queued state");
            }
        }
        tracing::debug!(reason = reason.as_str(), "deferred");
        settle(&msg, request_id, AckKind::Nak(Some(self.defer_delay))).await;
    }

    /// Publishes the original payload to `ev.rejected`, records the state, then terminates the
    /// message. Any failure naks it instead, so a rejection is never lost; the retried publish
    /// is deduplicated.
    async fn reject(
        &self,
        msg: Message,
        d: Delivery,
        request_id: Uuid,
        reason: RejectReason,
        detail: &str,
        record: Option<RequestRecord>,
    ) {
        let publish = PublishMessage::build()
            .payload(msg.payload.clone())
            .message_id(format!("rejected-{}-{}", msg.subject, d.stream_seq))
            .header(headers::REJECT_REASON, reason.as_str())
            .header(headers::REJECT_DETAIL, header_value(detail))
            .header(headers::SOURCE_SUBJECT, header_value(msg.subject.as_str()))
            .header(headers::SOURCE_SEQUENCE, d.stream_seq.to_string())
            .header(headers::REQUEST_ID, request_id.to_string());
        if let Err(e) = self.publish(subjects::REJECTED.to_owned(), publish).await {
            if copy_never_fits(&e) && d.delivered >= REJECT_ATTEMPTS {
                // Retrying cannot store this copy (e.g. the payload plus the rejection headers
                // exceed the server's max payload): naking it for ever would keep it, and every
                // message like it, in flight, stalling the pipeline.
                tracing::error!(%request_id, reason = reason.as_str(), error = %e, attempts = d.delivered, "rejection cannot be stored in ev.rejected; dropping the request");
                self.metrics
                    .rejections_dropped
                    .with_label_values(&[reason.as_str()])
                    .inc();
                settle(&msg, request_id, AckKind::Term).await;
                return;
            }
            tracing::warn!(%request_id, reason = reason.as_str(), error = %e, "rejection not stored; retrying later");
            settle(&msg, request_id, AckKind::Nak(Some(self.defer_delay))).await;
            return;
        }
        if let Some(record) = record
            && let Err(e) = self.record_rejected(&record).await
        {
            tracing::warn!(%request_id, error = %e, "cannot record the rejected state; retrying later");
            settle(&msg, request_id, AckKind::Nak(Some(self.defer_delay))).await;
            return;
        }
        tracing::debug!(%request_id, reason = reason.as_str(), detail, "rejected");
        self.metrics
            .rejected
            .with_label_values(&[reason.as_str()])
            .inc();
        settle(&msg, request_id, AckKind::Term).await;
    }

    /// Publishes to JetStream and awaits the PubAck, timing it.
    async fn publish(
        &self,
        subject: String,
        publish: PublishMessage,
    ) -> Result<PublishAck, PublishError> {
        let started = Instant::now();
        let ack = self.js.send_publish(subject, publish).await?.await?;
        self.metrics
            .publish_ack_duration
            .observe(started.elapsed().as_secs_f64());
        Ok(ack)
    }
}

/// Whether publishing a rejection copy failed for a reason retrying cannot fix: the message is
/// larger than the server takes, or the server refused it (a stream limit). Timeouts, a lost
/// connection or a missing stream (a server restarting) may pass.
fn copy_never_fits(error: &PublishError) -> bool {
    use async_nats::jetstream::context::PublishErrorKind;
    matches!(
        error.kind(),
        PublishErrorKind::MaxPayloadExceeded | PublishErrorKind::Other
    )
}

/// Acks, naks or terms. A failure means the connection is gone: the server redelivers the
/// message after AckWait, and the dispatch dedupe makes that harmless.
pub(crate) async fn settle(msg: &Message, request_id: Uuid, kind: AckKind) {
    if let Err(e) = msg.ack_with(kind).await {
        tracing::warn!(%request_id, error = %e, ack = ?kind, "cannot settle the request message; it will be redelivered");
    }
}

fn header<'a>(headers: Option<&'a HeaderMap>, name: &str) -> Option<&'a str> {
    headers?.get(name).map(|v| v.as_str())
}

/// The string `field` of a body that failed validation, if it has one.
fn body_str(payload: &[u8], field: &str) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(payload).ok()?;
    Some(value.get(field)?.as_str()?.to_owned())
}

/// `request_id` of a body that failed validation for other reasons, when it is a UUID.
fn body_request_id(payload: &[u8]) -> Option<Uuid> {
    Uuid::parse_str(&body_str(payload, "request_id")?).ok()
}

/// `departure` of a body that failed validation, when it is an RFC 3339 time.
fn body_departure(payload: &[u8]) -> Option<DateTime<Utc>> {
    let departure = DateTime::parse_from_rfc3339(&body_str(payload, "departure")?).ok()?;
    Some(departure.to_utc())
}

/// Header values cannot hold CR or LF (the client would panic) and should stay short; field
/// names in a detail come from the payload, so anything may be in them.
fn header_value(s: &str) -> String {
    let mut end = s.len().min(MAX_DETAIL_BYTES);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end]
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

fn rejected_record(
    request: &ChargeRequest,
    request_id: Uuid,
    reason: RejectReason,
    accepted_at: DateTime<Utc>,
    now: DateTime<Utc>,
) -> RequestRecord {
    RequestRecord {
        reason: Some(reason.as_str().to_owned()),
        rejected_at: Some(now),
        ..RequestRecord::new(
            request_id,
            RequestState::Rejected,
            request,
            accepted_at,
            now,
        )
    }
}

fn to_json(record: &RequestRecord) -> bytes::Bytes {
    serde_json::to_vec(record)
        .expect("a RequestRecord serializes")
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_values_are_single_line_and_bounded() {
        assert_eq!(header_value("a\r\nb: unknown field"), "a  b: unknown field");
        let long = "é".repeat(MAX_DETAIL_BYTES);
        let v = header_value(&long);
        assert!(v.len() <= MAX_DETAIL_BYTES && v.chars().all(|c| c == 'é'));
    }

    #[test]
    fn a_request_id_is_found_in_an_invalid_body() {
        let id = Uuid::new_v4();
        let body = format!(r#"{{"request_id":"{id}","energy_kwh":-1}}"#);
        assert_eq!(body_request_id(body.as_bytes()), Some(id));
        assert_eq!(body_request_id(br#"{"request_id":"nope"}"#), None);
        assert_eq!(body_request_id(b"not json"), None);
    }
}
