//! Message types on the wire (JSON). Each type names the subject it travels on; the field names
//! are the public contract (docs/nats.md) and never change meaning.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A charge request: the body of `POST /v1/charge-requests` and of a message on `ev.requests`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChargeRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<Uuid>,
    pub vehicle_id: String,
    pub energy_kwh: f64,
    pub max_power_kw: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub departure: Option<DateTime<Utc>>,
    /// Reject the request unless all of `energy_kwh` can be delivered before `departure`. By
    /// default a request that cannot be filled before its departure is charged as far as it
    /// can be (best effort, [`expected_energy_kwh`]).
    #[serde(default, skip_serializing_if = "is_false")]
    pub all_or_nothing: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// Below this, a best-effort request gets nothing worth a session: it is rejected as
/// `undeliverable` instead (a car leaving within seconds).
pub const MIN_BEST_EFFORT_KWH: f64 = 0.1;

/// What a request can expect to receive when its car leaves before `energy_kwh` fits: what the
/// car takes at `max_power_kw` from `now` to `departure` (best effort). `None` when the whole
/// energy fits, or there is no departure.
pub fn expected_energy_kwh(
    energy_kwh: f64,
    max_power_kw: f64,
    departure: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> Option<f64> {
    let hours_left =
        (departure? - now).num_milliseconds() as f64 / 1000.0 / crate::SECONDS_PER_HOUR;
    let most = max_power_kw * hours_left.max(0.0);
    (most < energy_kwh).then_some(most)
}

/// Namespace for request ids derived from something else (a stream sequence, an idempotency
/// key that is not a UUID). Fixed forever: changing it changes every derived id.
pub const REQUEST_ID_NAMESPACE: Uuid = Uuid::from_u128(0x6576_6772_6964_4e53_8000_0000_0000_0001);

/// The stable request id of a request published without one: derived from its position in the
/// `EV_REQUESTS` stream, so every redelivery gets the same id.
pub fn request_id_from_sequence(stream_sequence: u64) -> Uuid {
    Uuid::new_v5(
        &REQUEST_ID_NAMESPACE,
        format!("EV_REQUESTS/{stream_sequence}").as_bytes(),
    )
}

/// The request id named by an `Idempotency-Key` header: the key itself when it is a UUID,
/// otherwise a UUID derived from it (the same key always gives the same id).
pub fn request_id_from_idempotency_key(key: &str) -> Uuid {
    Uuid::parse_str(key).unwrap_or_else(|_| {
        Uuid::new_v5(
            &REQUEST_ID_NAMESPACE,
            format!("idempotency-key/{key}").as_bytes(),
        )
    })
}

/// The first 48 bits of a request id ingest made for an API key: they name the key's owner
/// (ingest keys them with a secret, docs/security.md), so that the id tells whose it is.
pub type OwnerTag = [u8; 6];

/// The owner tag of `id` (its first 48 bits).
pub fn owner_tag(id: Uuid) -> OwnerTag {
    id.as_bytes()[..6].try_into().expect("6 bytes")
}

/// `id` with its first 48 bits replaced by `tag`; its version and variant stay.
pub fn with_owner_tag(tag: OwnerTag, id: Uuid) -> Uuid {
    let mut bytes = *id.as_bytes();
    bytes[..6].copy_from_slice(&tag);
    Uuid::from_bytes(bytes)
}

/// A heartbeat on `ev.telemetry.<substation_id>`: the substation's state at `sent_at`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub substation_id: String,
    /// Increases by one per heartbeat of this substation process.
    pub seq: u64,
    pub sent_at: DateTime<Utc>,
    pub capacity_kw: f64,
    /// Power drawn right now: never above `capacity_kw`.
    pub load_kw: f64,
    /// Sessions drawing power.
    pub active_sessions: u32,
    /// Sessions accepted but waiting (paused) for power.
    #[serde(default)]
    pub queued_sessions: u32,
    /// What every accepted session would draw if the substation were unlimited: the sum of
    /// their max power. Above `capacity_kw` means the substation is saturated.
    #[serde(default)]
    pub demand_kw: f64,
    /// The highest `EV_DISPATCH` stream sequence this substation has taken. The dispatcher stops
    /// counting the assignments up to here as "sent but not yet in the load", so nothing is
    /// counted twice.
    #[serde(default)]
    pub dispatch_seq: u64,
    /// How often this substation heartbeats, in milliseconds. Silent for 1.5 intervals (at least
    /// one interval + 0.5 s) = out: `liveness::stale_after`.
    #[serde(default = "default_interval_ms")]
    pub interval_ms: u64,
}

fn default_interval_ms() -> u64 {
    1000
}

/// Upper edges of the departure buckets of a [`Projection`], in seconds after the heartbeat:
/// 5, 15 and 30 minutes, then 1, 2, 3, 4, 6, 8, 12 and 24 hours.
pub const PROJECTION_HORIZONS_S: [f64; 11] = [
    300.0, 900.0, 1800.0, 3600.0, 7200.0, 10800.0, 14400.0, 21600.0, 28800.0, 43200.0, 86400.0,
];

/// What a substation's sessions still need, summarised for routing (the dispatcher's
/// `predictive` policy): how much energy must be delivered by when. One number per horizon,
/// whatever the number of sessions, so a heartbeat stays small at thousands of cars.
///
/// Each session counts the energy it still needs, capped at what it can still draw at its max
/// power before it leaves (energy it could never take is no load).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Projection {
    /// Upper edges of the departure buckets, seconds after `sent_at`, ascending
    /// ([`PROJECTION_HORIZONS_S`] today).
    pub horizons_s: Vec<f64>,
    /// `due_kwh[k]`: energy still to deliver to the sessions leaving within `horizons_s[k]`
    /// (cumulative: each bucket includes the earlier ones).
    pub due_kwh: Vec<f64>,
    /// Energy still to deliver to every session, including those without a departure or
    /// leaving after the last horizon.
    pub remaining_kwh: f64,
}

/// A heartbeat as substations publish it on `ev.telemetry.<substation_id>`: every [`Heartbeat`]
/// field plus the projection and the limit in force, in one flat JSON object. The additions are optional, so
/// readers of [`Heartbeat`] alone (unknown fields are ignored) and heartbeats of older
/// substations both keep working.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Telemetry {
    #[serde(flatten)]
    pub heartbeat: Heartbeat,
    /// What the sessions still need, for predictive routing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub projection: Option<Projection>,
    /// The capacity the substation was configured with (kW), present while a grid operator's
    /// limit (`ev.limits.<substation_id>`) sets `capacity_kw` to something else.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub configured_capacity_kw: Option<f64>,
    /// When the limit in force ends; absent while it holds until the next limit message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit_until: Option<DateTime<Utc>>,
}

/// The largest capacity a heartbeat (or a substation's `--capacity-kw`) may state: 1 GW, far
/// above any site that charges cars. Bounds a lie: a forged 1e308 kW would take every request.
pub const CAPACITY_KW_MAX: f64 = 1_000_000.0;
/// The shortest heartbeat interval a heartbeat may state, ms (`--heartbeat-interval` 1ms).
pub const INTERVAL_MS_MIN: u64 = 1;
/// The longest heartbeat interval a heartbeat may state, ms (`--heartbeat-interval` 1h): a
/// longer one would keep a dead substation "up" for days.
pub const INTERVAL_MS_MAX: u64 = 3_600_000;
/// Most buckets a heartbeat's projection may have ([`PROJECTION_HORIZONS_S`] has 11).
pub const PROJECTION_BUCKETS_MAX: usize = 64;

/// Why a message on `ev.telemetry.<id>` is not taken as the heartbeat of substation `<id>`:
/// it is dropped, logged and counted (label [`HeartbeatError::reason`]).
#[derive(Debug, thiserror::Error)]
pub enum HeartbeatError {
    #[error("not a heartbeat: {0}")]
    Malformed(#[from] serde_json::Error),
    /// The body speaks for another substation than its subject (or the subject is no
    /// substation's): a heartbeat is judged by who sent it, the subject's substation.
    #[error("sent on {subject} but names substation {named:?}")]
    WrongSubstation { subject: String, named: String },
    #[error("{field} is out of bounds ({bounds}): {value}")]
    OutOfBounds {
        field: &'static str,
        bounds: &'static str,
        value: f64,
    },
}

impl HeartbeatError {
    /// Every value of [`HeartbeatError::reason`].
    pub const REASONS: [&'static str; 3] = ["malformed", "wrong_substation", "out_of_bounds"];

    /// A metric label: one of [`HeartbeatError::REASONS`].
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Malformed(_) => "malformed",
            Self::WrongSubstation { .. } => "wrong_substation",
            Self::OutOfBounds { .. } => "out_of_bounds",
        }
    }
}

impl Telemetry {
    /// Reads a heartbeat received on `subject` and checks it: its substation must be the
    /// subject's, and its numbers within bounds (capacity 0 to [`CAPACITY_KW_MAX`], load 0 to
    /// the capacity, demand and projection finite and not negative, interval
    /// [`INTERVAL_MS_MIN`] to [`INTERVAL_MS_MAX`]).
    pub fn parse(subject: &str, payload: &[u8]) -> Result<Self, HeartbeatError> {
        let telemetry: Telemetry = serde_json::from_slice(payload)?;
        let named = &telemetry.heartbeat.substation_id;
        let subject_id = crate::subjects::substation_of(subject)
            .filter(|id| crate::subjects::valid_substation_id(id));
        if subject_id != Some(named.as_str()) {
            return Err(HeartbeatError::WrongSubstation {
                subject: subject.to_owned(),
                named: named.clone(),
            });
        }
        telemetry.check_bounds()?;
        Ok(telemetry)
    }

    fn check_bounds(&self) -> Result<(), HeartbeatError> {
        let h = &self.heartbeat;
        let out = |field, bounds, value| HeartbeatError::OutOfBounds {
            field,
            bounds,
            value,
        };
        let capacity = |x: f64| x.is_finite() && (0.0..=CAPACITY_KW_MAX).contains(&x);
        let amount = |x: f64| x.is_finite() && x >= 0.0;
        if !capacity(h.capacity_kw) {
            return Err(out("capacity_kw", "0 to 1e6 kW", h.capacity_kw));
        }
        if let Some(c) = self.configured_capacity_kw
            && !capacity(c)
        {
            return Err(out("configured_capacity_kw", "0 to 1e6 kW", c));
        }
        // A hair of float rounding above the capacity is still within it.
        let most = h.capacity_kw * (1.0 + 1e-9) + 1e-9;
        if !(amount(h.load_kw) && h.load_kw <= most) {
            return Err(out("load_kw", "0 to capacity_kw", h.load_kw));
        }
        if !amount(h.demand_kw) {
            return Err(out("demand_kw", "0 or more", h.demand_kw));
        }
        if !(INTERVAL_MS_MIN..=INTERVAL_MS_MAX).contains(&h.interval_ms) {
            return Err(out(
                "interval_ms",
                "1 to 3,600,000 ms",
                h.interval_ms as f64,
            ));
        }
        if let Some(p) = &self.projection {
            if p.horizons_s.len() > PROJECTION_BUCKETS_MAX
                || p.due_kwh.len() > PROJECTION_BUCKETS_MAX
            {
                return Err(out(
                    "projection",
                    "at most 64 buckets",
                    p.horizons_s.len().max(p.due_kwh.len()) as f64,
                ));
            }
            let bad = std::iter::once(p.remaining_kwh)
                .chain(p.horizons_s.iter().copied())
                .chain(p.due_kwh.iter().copied())
                .find(|x| !amount(*x));
            if let Some(x) = bad {
                return Err(out("projection", "finite, 0 or more", x));
            }
        }
        Ok(())
    }
}

/// A grid operator's capacity limit on `ev.limits.<substation_id>` (stream `EV_LIMITS`, which
/// keeps the last one per substation so a restarted substation applies it again).
///
/// `{"capacity_kw": 80, "until": "2026-11-25T18:00:00Z"}`: the substation draws at most 80 kW
/// until then. Without `until` the limit holds until the next message; `capacity_kw` null or
/// absent means back to the configured capacity.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limit {
    #[serde(default)]
    pub capacity_kw: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<DateTime<Utc>>,
}

/// Why a [`Limit`] message cannot be applied.
#[derive(Debug, thiserror::Error)]
pub enum LimitError {
    #[error(
        "not a limit (expected {{\"capacity_kw\": <kW or null>, \"until\": <RFC 3339, optional>}}): {0}"
    )]
    Malformed(#[from] serde_json::Error),
    #[error("capacity_kw must be a number of kW, 0 or more, got {0}")]
    Capacity(f64),
}

impl Limit {
    /// Parses and checks a limit message body.
    pub fn parse(payload: &[u8]) -> Result<Self, LimitError> {
        let limit: Limit = serde_json::from_slice(payload)?;
        match limit.capacity_kw {
            Some(kw) if !(kw.is_finite() && kw >= 0.0) => Err(LimitError::Capacity(kw)),
            _ => Ok(limit),
        }
    }
}

/// An assignment on `ev.dispatch.<substation_id>`: the request, where it goes, and when.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Dispatch {
    pub request_id: Uuid,
    pub substation_id: String,
    pub vehicle_id: String,
    pub energy_kwh: f64,
    /// Best effort: the energy the car can take before its departure, when that is less than
    /// `energy_kwh` ([`expected_energy_kwh`]); the session charges this much.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub energy_expected_kwh: Option<f64>,
    pub max_power_kw: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub departure: Option<DateTime<Utc>>,
    pub accepted_at: DateTime<Utc>,
    pub dispatched_at: DateTime<Utc>,
    /// Sequence of the request in `EV_REQUESTS` (for replay and tracing).
    pub request_seq: u64,
}

impl Dispatch {
    /// The energy the session charges: the expected energy of a best-effort request, else the
    /// whole request.
    pub fn energy_target_kwh(&self) -> f64 {
        self.energy_expected_kwh
            .map_or(self.energy_kwh, |e| e.min(self.energy_kwh))
    }
}

/// Kinds of session events, the last token of `ev.sessions.<substation_id>.<event>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionEventKind {
    /// The substation took the assignment (it may still wait for power).
    Accepted,
    /// The car started drawing power.
    Started,
    /// The session ended: its energy was delivered, or the car left at its departure
    /// (`outcome` in [`SessionReport`] says which).
    Completed,
    /// The session stopped before completion (substation shut down); it resumes on restart.
    Interrupted,
}

impl SessionEventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Accepted => "accepted",
            Self::Started => "started",
            Self::Completed => "completed",
            Self::Interrupted => "interrupted",
        }
    }
}

/// How a session ended: on `completed` events ([`SessionReport`]) and, as `reason`, in the
/// `completed` request state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionOutcome {
    /// The requested energy was delivered.
    Delivered,
    /// The car left at its departure with less than it asked for.
    Departed,
}

impl SessionOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Delivered => "delivered",
            Self::Departed => "departed",
        }
    }
}

/// A session event as substations publish it: every [`SessionEvent`] field plus, on `completed`
/// events, how the session ended, in one flat JSON object. Readers of [`SessionEvent`] alone keep
/// working (unknown fields are ignored).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionReport {
    #[serde(flatten)]
    pub event: SessionEvent,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<SessionOutcome>,
}

/// A session lifecycle event on `ev.sessions.<substation_id>.<event>` (stream `EV_SESSIONS`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionEvent {
    pub event: SessionEventKind,
    pub request_id: Uuid,
    pub substation_id: String,
    pub vehicle_id: String,
    /// Wall-clock time of the event.
    pub at: DateTime<Utc>,
    pub energy_kwh: f64,
    pub energy_delivered_kwh: f64,
    pub accepted_at: DateTime<Utc>,
    pub dispatched_at: DateTime<Utc>,
}

/// Where a request is in its life, as `GET /v1/charge-requests/{id}` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestState {
    Queued,
    Dispatched,
    Charging,
    Completed,
    Rejected,
}

impl RequestState {
    pub fn is_final(self) -> bool {
        matches!(self, Self::Completed | Self::Rejected)
    }
}

/// The state of a request: a value in the `EV_REQUEST_STATE` bucket, under its id (the
/// dispatcher's record) or under `<id>.<substation>` (that substation's session,
/// [`session_state_key`]); merged ([`RequestRecord::merged`]), the body of
/// `GET /v1/charge-requests/{id}`.
///
/// Each key has one writer (the dispatcher's fence of a failed substation's session aside), and
/// every write is a compare-and-set, so a later state is never overwritten by an earlier one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestRecord {
    pub request_id: Uuid,
    pub state: RequestState,
    pub vehicle_id: String,
    pub energy_kwh: f64,
    /// Best effort: what the car can take before its departure when that is less than
    /// `energy_kwh` (set when the request is dispatched).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub energy_expected_kwh: Option<f64>,
    pub max_power_kw: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub departure: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub substation_id: Option<String>,
    pub energy_delivered_kwh: f64,
    /// `rejected`: why ([`RejectReason`]). `completed`: how the session ended
    /// ([`SessionOutcome`]: `delivered`, or `departed` with less energy than asked for).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub accepted_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dispatched_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub charging_started_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejected_at: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
    /// The substations the request left before this one (failover), oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub moved: Vec<Move>,
    /// With `--chargers ocpp`: the station transaction the session charges in (written by
    /// the substation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub charger: Option<ChargerSession>,
}

/// Where a session charges with `--chargers ocpp` (docs/ocpp.md): its station's transaction.
/// Kept in the session's record so a restarted substation knows the car again: a
/// transaction's later events carry no idToken.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChargerSession {
    pub station_id: String,
    pub transaction_id: String,
    /// Energy the request had before this transaction began, kWh.
    pub energy_before_kwh: f64,
}

/// One move of a request away from a failed substation (`RequestRecord::moved`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Move {
    /// The substation it left.
    pub substation_id: String,
    /// The `EV_DISPATCH` sequence of the dispatch to it: that dispatch is void.
    pub dispatch_seq: u64,
    /// Its state there when it was moved: `dispatched` (never started) or `charging`.
    pub state: RequestState,
    /// Energy delivered up to then (charged elsewhere, it counts towards the request).
    pub energy_delivered_kwh: f64,
    pub moved_at: DateTime<Utc>,
    /// Why, readable: e.g. `no heartbeat from s1 for 10.2 s`.
    pub reason: String,
}

/// The key under which substation `substation_id` records its session of request
/// `request_id` in `EV_REQUEST_STATE`: `<request id>.<substation id>`. The dispatcher writes
/// the request's own key (`<request id>`: queued, dispatched, rejected, moved); each
/// substation writes only its own session keys, which the server's permissions hold it to,
/// since the key's subject names the substation (docs/architecture.md, "Request state").
pub fn session_state_key(request_id: Uuid, substation_id: &str) -> String {
    format!("{request_id}.{substation_id}")
}

impl RequestRecord {
    /// The first record of `request`: in `state`, nothing delivered, no substation yet and no
    /// step timestamps. Writers fill in the rest as the request moves on.
    pub fn new(
        request_id: Uuid,
        state: RequestState,
        request: &ChargeRequest,
        accepted_at: DateTime<Utc>,
        updated_at: DateTime<Utc>,
    ) -> Self {
        Self {
            request_id,
            state,
            vehicle_id: request.vehicle_id.clone(),
            energy_kwh: request.energy_kwh,
            energy_expected_kwh: None,
            max_power_kw: request.max_power_kw,
            departure: request.departure,
            substation_id: None,
            energy_delivered_kwh: 0.0,
            reason: None,
            accepted_at,
            dispatched_at: None,
            charging_started_at: None,
            completed_at: None,
            rejected_at: None,
            updated_at,
            moved: Vec::new(),
            charger: None,
        }
    }

    /// The request as its readers see it, from the dispatcher's record (`<request id>`) and the
    /// session record (`<request id>.<substation>`) of the substation that record names: that
    /// substation's own record once it has one, else the dispatcher's. A session record counts
    /// only if it is that substation's (a dispatcher's fence, written when it moved the request
    /// away, names none), so no other substation's write can stand for the request.
    pub fn merged(dispatcher: Option<Self>, session: Option<Self>) -> Option<Self> {
        let dispatcher = dispatcher?;
        match session {
            Some(s)
                if dispatcher.substation_id.is_some()
                    && s.substation_id == dispatcher.substation_id
                    && s.request_id == dispatcher.request_id =>
            {
                Some(s)
            }
            _ => Some(dispatcher),
        }
    }

    /// The record of `dispatch` in `state` at its substation: nothing delivered yet and no
    /// charging timestamps. The dispatcher writes it as `dispatched`; the substation builds
    /// every later record of the session from it.
    pub fn of_dispatch(
        dispatch: &Dispatch,
        state: RequestState,
        updated_at: DateTime<Utc>,
    ) -> Self {
        let d = dispatch;
        Self {
            request_id: d.request_id,
            state,
            vehicle_id: d.vehicle_id.clone(),
            energy_kwh: d.energy_kwh,
            energy_expected_kwh: d.energy_expected_kwh,
            max_power_kw: d.max_power_kw,
            departure: d.departure,
            substation_id: Some(d.substation_id.clone()),
            energy_delivered_kwh: 0.0,
            reason: None,
            accepted_at: d.accepted_at,
            dispatched_at: Some(d.dispatched_at),
            charging_started_at: None,
            completed_at: None,
            rejected_at: None,
            updated_at,
            moved: Vec::new(),
            charger: None,
        }
    }
}

/// Why a request on `ev.requests` can never be served (header `Evgrid-Reject-Reason`, metric
/// label `reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectReason {
    /// The payload is not JSON.
    NotJson,
    /// JSON, but fields break the rules of the HTTP API.
    InvalidFields,
    /// The departure is already in the past.
    DeparturePassed,
    /// No substation could deliver the energy before the departure even at the car's full power.
    Undeliverable,
}

impl RejectReason {
    pub const ALL: [RejectReason; 4] = [
        Self::NotJson,
        Self::InvalidFields,
        Self::DeparturePassed,
        Self::Undeliverable,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotJson => "not_json",
            Self::InvalidFields => "invalid_fields",
            Self::DeparturePassed => "departure_passed",
            Self::Undeliverable => "undeliverable",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_record_stands_for_its_request_only_where_the_dispatcher_sent_it() {
        let id = Uuid::from_u128(9);
        let request = ChargeRequest {
            request_id: Some(id),
            vehicle_id: "ev".into(),
            energy_kwh: 10.0,
            max_power_kw: 11.0,
            departure: None,
            all_or_nothing: false,
        };
        let at = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        let queued = RequestRecord::new(id, RequestState::Queued, &request, at, at);
        let at_s1 = |state| RequestRecord {
            state,
            substation_id: Some("s1".into()),
            ..queued.clone()
        };
        let dispatched = at_s1(RequestState::Dispatched);
        let charging = at_s1(RequestState::Charging);
        let merged = RequestRecord::merged;
        assert_eq!(merged(None, Some(charging.clone())), None);
        assert_eq!(
            merged(Some(queued.clone()), Some(charging.clone())),
            Some(queued.clone())
        );
        assert_eq!(
            merged(Some(dispatched.clone()), None),
            Some(dispatched.clone())
        );
        assert_eq!(
            merged(Some(dispatched.clone()), Some(charging.clone())),
            Some(charging.clone())
        );
        // Another substation's record, or a fence (no substation), never stands for it.
        let at_s2 = RequestRecord {
            substation_id: Some("s2".into()),
            ..charging.clone()
        };
        assert_eq!(
            merged(Some(dispatched.clone()), Some(at_s2)),
            Some(dispatched.clone())
        );
        assert_eq!(
            merged(Some(dispatched.clone()), Some(queued)),
            Some(dispatched)
        );
        assert_eq!(session_state_key(id, "s1"), format!("{id}.s1"));
    }

    #[test]
    fn a_car_leaving_early_can_expect_what_fits() {
        let now = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        let in_90_min = Some(now + chrono::Duration::minutes(90));
        // 6.6 kW for 1.5 h is 9.9 kWh.
        let e = expected_energy_kwh(26.0, 6.6, in_90_min, now).unwrap();
        assert!((e - 9.9).abs() < 1e-9, "{e}");
        assert_eq!(expected_energy_kwh(9.0, 6.6, in_90_min, now), None, "fits");
        assert_eq!(
            expected_energy_kwh(26.0, 6.6, None, now),
            None,
            "no departure"
        );
        let gone = Some(now - chrono::Duration::minutes(1));
        assert_eq!(expected_energy_kwh(26.0, 6.6, gone, now), Some(0.0));
    }

    #[test]
    fn derived_ids_are_stable_and_distinct() {
        assert_eq!(request_id_from_sequence(7), request_id_from_sequence(7));
        assert_ne!(request_id_from_sequence(7), request_id_from_sequence(8));
        let id = Uuid::new_v4();
        assert_eq!(request_id_from_idempotency_key(&id.to_string()), id);
        assert_eq!(
            request_id_from_idempotency_key("order-42"),
            request_id_from_idempotency_key("order-42")
        );
    }

    fn heartbeat() -> Heartbeat {
        Heartbeat {
            substation_id: "s1".into(),
            seq: 3,
            sent_at: DateTime::from_timestamp(1_800_000_000, 0).unwrap(),
            capacity_kw: 80.0,
            load_kw: 40.0,
            active_sessions: 4,
            queued_sessions: 1,
            demand_kw: 50.0,
            dispatch_seq: 9,
            interval_ms: 1000,
        }
    }

    #[test]
    fn telemetry_is_a_heartbeat_with_optional_additions() {
        let telemetry = Telemetry {
            heartbeat: heartbeat(),
            projection: Some(Projection {
                horizons_s: PROJECTION_HORIZONS_S.to_vec(),
                due_kwh: vec![1.0; PROJECTION_HORIZONS_S.len()],
                remaining_kwh: 3.0,
            }),
            configured_capacity_kw: Some(150.0),
            limit_until: None,
        };
        let json = serde_json::to_value(&telemetry).unwrap();
        // One flat object: the heartbeat's fields at the top level.
        assert_eq!(json["capacity_kw"], 80.0);
        assert_eq!(json["projection"]["remaining_kwh"], 3.0);
        assert!(json.get("limit_until").is_none());
        // Readers of the plain heartbeat still read it.
        let plain: Heartbeat = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(plain, heartbeat());
        assert_eq!(
            serde_json::from_value::<Telemetry>(json).unwrap(),
            telemetry
        );
        // A plain heartbeat is telemetry without additions.
        let old = serde_json::to_vec(&heartbeat()).unwrap();
        let read: Telemetry = serde_json::from_slice(&old).unwrap();
        assert_eq!((read.heartbeat, read.projection), (heartbeat(), None));
    }

    #[test]
    fn a_heartbeat_is_its_subjects_and_within_bounds() {
        let body = |f: &dyn Fn(&mut Telemetry)| {
            let mut t = Telemetry {
                heartbeat: heartbeat(),
                projection: None,
                configured_capacity_kw: None,
                limit_until: None,
            };
            f(&mut t);
            serde_json::to_vec(&t).unwrap()
        };
        let ok = body(&|_| {});
        assert!(Telemetry::parse("ev.telemetry.s1", &ok).is_ok());
        for subject in ["ev.telemetry.zzz", "ev.telemetry", "ev.telemetry.s1.x"] {
            let err = Telemetry::parse(subject, &ok).unwrap_err();
            assert_eq!(err.reason(), "wrong_substation", "{subject}");
        }
        assert_eq!(
            Telemetry::parse("ev.telemetry.s1", b"{")
                .unwrap_err()
                .reason(),
            "malformed"
        );
        let out_of_bounds: [&dyn Fn(&mut Telemetry); 8] = [
            &|t| t.heartbeat.load_kw = -50.0,
            &|t| t.heartbeat.load_kw = 80.5,
            &|t| t.heartbeat.capacity_kw = 1e308,
            &|t| t.heartbeat.capacity_kw = 2e6,
            &|t| t.heartbeat.interval_ms = 0,
            &|t| t.heartbeat.interval_ms = 3_600_001,
            &|t| t.configured_capacity_kw = Some(-1.0),
            &|t| {
                t.projection = Some(Projection {
                    horizons_s: vec![300.0],
                    due_kwh: vec![-1.0],
                    remaining_kwh: 0.0,
                })
            },
        ];
        for (i, change) in out_of_bounds.iter().enumerate() {
            let err = Telemetry::parse("ev.telemetry.s1", &body(*change)).unwrap_err();
            assert_eq!(err.reason(), "out_of_bounds", "case {i}: {err}");
        }
        // At the edges: accepted.
        let edges = body(&|t| {
            t.heartbeat.capacity_kw = CAPACITY_KW_MAX;
            t.heartbeat.load_kw = CAPACITY_KW_MAX;
            t.heartbeat.interval_ms = INTERVAL_MS_MAX;
        });
        assert!(Telemetry::parse("ev.telemetry.s1", &edges).is_ok());
    }

    #[test]
    fn limits_parse_or_say_why_not() {
        let limit = Limit::parse(br#"{"capacity_kw": 80, "until": "2026-11-25T18:00:00Z"}"#);
        assert_eq!(limit.unwrap().capacity_kw, Some(80.0));
        assert_eq!(
            Limit::parse(br#"{"capacity_kw": null}"#).unwrap(),
            Limit::default()
        );
        assert_eq!(Limit::parse(b"{}").unwrap(), Limit::default());
        for bad in [
            &br#"{"capacity_kw": -1}"#[..],
            br#"{"capacity_kw": "lots"}"#,
            br#"{"capacity": 80}"#,
            br#"{"capacity_kw": 80, "until": "tomorrow"}"#,
            b"not json",
        ] {
            assert!(
                Limit::parse(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn session_reports_carry_the_outcome_beside_the_event() {
        let at = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        let event = SessionEvent {
            event: SessionEventKind::Completed,
            request_id: Uuid::nil(),
            substation_id: "s1".into(),
            vehicle_id: "ev".into(),
            at,
            energy_kwh: 30.0,
            energy_delivered_kwh: 12.5,
            accepted_at: at,
            dispatched_at: at,
        };
        let report = SessionReport {
            event: event.clone(),
            outcome: Some(SessionOutcome::Departed),
        };
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["outcome"], "departed");
        assert_eq!(json["event"], "completed");
        assert_eq!(serde_json::from_value::<SessionEvent>(json).unwrap(), event);
    }

    #[test]
    fn states_serialize_as_the_documented_words() {
        let words: Vec<String> = [
            RequestState::Queued,
            RequestState::Dispatched,
            RequestState::Charging,
            RequestState::Completed,
            RequestState::Rejected,
        ]
        .iter()
        .map(|s| serde_json::to_string(s).unwrap())
        .collect();
        assert_eq!(
            words,
            [
                r#""queued""#,
                r#""dispatched""#,
                r#""charging""#,
                r#""completed""#,
                r#""rejected""#
            ]
        );
    }
}
