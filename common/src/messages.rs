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
    /// How often this substation heartbeats, in milliseconds. Silent for 3 intervals = out.
    #[serde(default = "default_interval_ms")]
    pub interval_ms: u64,
}

fn default_interval_ms() -> u64 {
    1000
}

/// An assignment on `ev.dispatch.<substation_id>`: the request, where it goes, and when.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Dispatch {
    pub request_id: Uuid,
    pub substation_id: String,
    pub vehicle_id: String,
    pub energy_kwh: f64,
    pub max_power_kw: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub departure: Option<DateTime<Utc>>,
    pub accepted_at: DateTime<Utc>,
    pub dispatched_at: DateTime<Utc>,
    /// Sequence of the request in `EV_REQUESTS` (for replay and tracing).
    pub request_seq: u64,
}

/// Kinds of session events, the last token of `ev.sessions.<substation_id>.<event>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionEventKind {
    /// The substation took the assignment (it may still wait for power).
    Accepted,
    /// The car started drawing power.
    Started,
    /// The requested energy was delivered.
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

/// The current state of a request: the value in the `EV_REQUEST_STATE` bucket under its id, and
/// the body of `GET /v1/charge-requests/{id}`.
///
/// Writers follow the request's causal order (dispatcher, then the substation, each awaiting its
/// write before the next stage can start), so a later state is never overwritten by an earlier one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestRecord {
    pub request_id: Uuid,
    pub state: RequestState,
    pub vehicle_id: String,
    pub energy_kwh: f64,
    pub max_power_kw: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub departure: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub substation_id: Option<String>,
    pub energy_delivered_kwh: f64,
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
