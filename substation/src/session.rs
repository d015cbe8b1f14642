//! A charging session as the live substation holds it: its assignment, the dispatch message
//! that is its durable record, and what to do with that message once its final writes are
//! durable.

use async_nats::jetstream::message::Acker;
use chrono::{DateTime, Utc};
use evgrid_model::messages::{
    ChargerSession, Dispatch, Move, RequestRecord, RequestState, SessionOutcome,
};
use futures::future::BoxFuture;
use uuid::Uuid;

use crate::plan::Accept;

/// A session this process is charging (or finishing): its assignment and its message.
pub(crate) struct Live {
    pub dispatch: Dispatch,
    /// The dispatch message's acker; `None` for a car that walked up to a charging station
    /// without a request (`--chargers ocpp`), which has no message.
    pub acker: Option<Acker>,
    /// `EV_DISPATCH` sequence and delivery count of the message held.
    pub stream_seq: u64,
    pub delivery: i64,
    /// Energy delivered before this process took the session (a resumed session), kWh.
    pub prior_kwh: f64,
    /// Wall time of the session's first power ever (kept across resumptions).
    pub charging_started_at: Option<DateTime<Utc>>,
    /// Where the request was before (failover), carried into every record written here.
    pub moved: Vec<Move>,
    /// When ingest accepted the request (header, else the dispatch body).
    pub accepted_at: DateTime<Utc>,
    /// Set once the session's final writes are queued: what to do with its message when they
    /// are durable.
    pub ending: Option<Ending>,
    /// The revision of the request's state this session last wrote or read: its next state
    /// write is a compare-and-set on it, so a state someone else moved on (the request moved
    /// away while this substation was cut off) is never overwritten.
    pub revision: u64,
    /// A state write of this session is in flight (one at a time: the next expects its
    /// revision).
    pub writing: Option<StateWrite>,
    /// The newest state to write once the one in flight is done.
    pub next: Option<StateWrite>,
    /// The `completed` event, announced only once the `completed` state is stored: a session
    /// fenced off (moved away meanwhile) never announces a completion it does not own.
    pub completion: Option<Completion>,
    /// With `--chargers ocpp`, a resumed session: the station transaction its car was charging
    /// in when its record was written.
    pub charger: Option<ChargerSession>,
}

/// What a session's `completed` event says.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Completion {
    pub at: DateTime<Utc>,
    pub energy_kwh: f64,
    pub outcome: SessionOutcome,
}

/// One state write of a session: the record, and whether it is the session's last.
#[derive(Debug, Clone)]
pub(crate) struct StateWrite {
    pub record: RequestRecord,
    pub last: bool,
}

/// What became of a session's state write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Written {
    /// Stored at this revision.
    Stored(u64),
    /// Refused: the state is not at the revision the session knew.
    Fenced,
    /// Never acknowledged (shutting down, or the writer is gone).
    Abandoned,
    /// The session's `completed` event, after its state, is stored (or abandoned).
    Announced,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ending {
    /// Completion written: ack.
    Completed,
    /// Interruption written (shutdown): hand the message back.
    Interrupted,
}

impl Live {
    /// The session of `dispatch`, held through its message (`acker`, at `stream_seq`, delivered
    /// `delivery` times), as [`crate::plan::plan`] accepted it.
    pub fn new(
        dispatch: Dispatch,
        acker: Acker,
        (stream_seq, delivery): (u64, i64),
        accept: &Accept,
        accepted_at: DateTime<Utc>,
        revision: u64,
    ) -> Self {
        Self {
            dispatch,
            acker: Some(acker),
            stream_seq,
            delivery,
            prior_kwh: accept.prior_kwh,
            charging_started_at: accept.charging_started_at,
            moved: accept.moved.clone(),
            accepted_at,
            ending: None,
            revision,
            writing: None,
            next: None,
            completion: None,
            charger: accept.charger.clone(),
        }
    }

    /// The session of a car that plugged in without a request (a walk-in): `dispatch` is made
    /// up for it here. Its state is new (revision 0) and it has no message to settle.
    pub fn walk_in(dispatch: Dispatch) -> Self {
        let accepted_at = dispatch.accepted_at;
        Self {
            dispatch,
            acker: None,
            stream_seq: 0,
            delivery: 1,
            prior_kwh: 0.0,
            charging_started_at: None,
            moved: Vec::new(),
            accepted_at,
            ending: None,
            revision: 0,
            writing: None,
            next: None,
            completion: None,
            charger: None,
        }
    }

    /// The state of a session waiting for power: `dispatched`, or still `charging` once it has
    /// drawn power (paused, or resumed by a new process), since states never go backwards.
    pub fn waiting_state(&self) -> RequestState {
        if self.charging_started_at.is_some() || self.prior_kwh > 0.0 {
            RequestState::Charging
        } else {
            RequestState::Dispatched
        }
    }
}

/// A state write's outcome, for the session it belongs to.
pub(crate) type Receipt = BoxFuture<'static, (Uuid, Written)>;
