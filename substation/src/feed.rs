//! The dispatch messages of one substation (`ev.dispatch.<id>`, durable consumer
//! `substation-<id>`), the input of ingest → dispatcher → **substation**, each with its
//! request's stored state read ahead.
//!
//! The messages come through the shared [`Intake`] (its own inbox, rebuilt when it breaks,
//! renewed on reconnect), so on shutdown the ones that reached this process unhandled are given
//! back at once instead of waiting out the ack wait. Up to [`READ_AHEAD`] messages are taken
//! while earlier ones are handled, each with its state read (`EV_REQUEST_STATE`) running
//! meanwhile, and handed out in delivery order: one awaited state read per dispatch, in turn,
//! capped a substation near 800 dispatches a second however idle its CPU (docs/benchmarks.md).

use std::collections::VecDeque;

use std::sync::Arc;

use async_nats::jetstream::{self, kv};
use evgrid_common::nats::{Intake, Nats};
use evgrid_common::streams;
use evgrid_model::messages::{RequestRecord, session_state_key};
use tokio::task::JoinHandle;
use uuid::Uuid;

/// Dispatches taken ahead of the one being handled.
const READ_AHEAD: usize = 64;

/// The stored state of a dispatch's request, read ahead of handling it, as this substation sees
/// it: its own session record (`<request id>.<id>`) while that is its own, else the
/// dispatcher's record (`<request id>`); `None` when there is neither (or they do not parse).
/// And the revision of its own session record (0 when the key never existed): what the
/// session's first write expects.
pub(crate) type StateRead = Result<(Option<RequestRecord>, u64), async_nats::Error>;

/// Dispatch messages in delivery order, with their request's state.
pub(crate) struct Feed {
    intake: Intake,
    kv: kv::Store,
    substation_id: Arc<str>,
    /// Taken from the intake, not handed out yet: each message with its state read.
    reading: VecDeque<(jetstream::Message, JoinHandle<StateRead>)>,
}

impl Feed {
    pub fn new(nats: &Nats, substation_id: &str, replicas: usize, kv: kv::Store) -> Self {
        let intake = Intake::new(
            nats,
            streams::DISPATCH,
            streams::substation_consumer(substation_id, replicas),
            "dispatch consumer",
            READ_AHEAD,
        );
        Self {
            intake,
            kv,
            substation_id: substation_id.into(),
            reading: VecDeque::new(),
        }
    }

    /// The next dispatch message, in delivery order, with its request's state. Cancel-safe:
    /// messages taken while waiting stay queued with their reads.
    pub async fn next(&mut self) -> (jetstream::Message, StateRead) {
        let Self {
            intake,
            kv,
            substation_id,
            reading,
        } = self;
        loop {
            let room = READ_AHEAD - reading.len();
            tokio::select! {
                biased;
                // Awaiting the handle by reference: dropping this future leaves it queued.
                state = async { (&mut reading.front_mut().expect("non-empty").1).await },
                    if !reading.is_empty() =>
                {
                    let (msg, _) = reading.pop_front().expect("non-empty");
                    let state = state.map_err(async_nats::Error::from).and_then(|read| read);
                    return (msg, state);
                }
                msg = intake.next(room), if room > 0 => {
                    let read = tokio::spawn(read_state(
                        kv.clone(),
                        substation_id.clone(),
                        request_id(&msg),
                    ));
                    reading.push_back((msg, read));
                }
            }
        }
    }

    /// Stops pulling; returns the messages taken but not handed out yet (their reads are
    /// dropped), then those that reached the inbox, in delivery order.
    pub async fn close(self) -> Vec<jetstream::Message> {
        let mut messages: Vec<jetstream::Message> = self
            .reading
            .into_iter()
            .map(|(msg, read)| {
                read.abort();
                msg
            })
            .collect();
        messages.extend(self.intake.close().await);
        messages
    }

    /// Reads a request's state now (a redelivery's read ahead may predate its own completion).
    pub async fn read_now(&self, request_id: Uuid) -> StateRead {
        read_state(
            self.kv.clone(),
            self.substation_id.clone(),
            Some(request_id),
        )
        .await
    }
}

/// The request id of a dispatch, from the body (`None` when the body is not a dispatch:
/// handling it terminates the message without a state).
fn request_id(msg: &jetstream::Message) -> Option<Uuid> {
    #[derive(serde::Deserialize)]
    struct Id {
        request_id: Uuid,
    }
    serde_json::from_slice::<Id>(&msg.payload)
        .ok()
        .map(|id| id.request_id)
}

async fn read_state(kv: kv::Store, substation_id: Arc<str>, request_id: Option<Uuid>) -> StateRead {
    let Some(request_id) = request_id else {
        return Ok((None, 0));
    };
    let own_key = session_state_key(request_id, &substation_id);
    let request_key = request_id.to_string();
    let (own, request) = tokio::join!(
        streams::read_state(&kv, &own_key),
        streams::read_state(&kv, &request_key)
    );
    let ((own, revision), (request, _)) = (own?, request?);
    // A fence (the dispatcher moved the request away) names no substation: then the
    // dispatcher's record says where the request is, and what this dispatch may do.
    let view = own
        .filter(|r| r.substation_id.as_deref() == Some(&*substation_id))
        .or(request);
    Ok((view, revision))
}
