//! The live substation's request-state writes (`EV_REQUEST_STATE`, key `<request id>.<its id>`:
//! its own session record, the only keys its NATS user may write), each a compare-and-set on
//! the revision the session last wrote or read, through the ordered
//! [`crate::publisher::Publisher`].
//!
//! This is the fencing of failover: a dispatcher moves a request away from a failed substation
//! by a compare-and-set on that substation's session record (a fence naming no substation), so
//! a substation that was only cut off (or frozen) and comes back finds its next write refused,
//! reads the record, sees the request is not its own any more, and stops charging it without
//! writing again: one car charges in one place, its energy is counted once.
//! A refused write whose state still names this substation (its own write stored but the ack
//! lost, or the dispatcher's `dispatched` written after the state was read) is written again on
//! the revision now stored.
//!
//! One write per session is in flight at a time, since the next one expects its revision; a
//! newer record replaces one still waiting (only the newest state matters).

use async_nats::jetstream::AckKind;
use async_nats::jetstream::message::PublishMessage;
use evgrid_common::streams;
use evgrid_model::messages::{RequestRecord, SessionEventKind, session_state_key};
use futures::FutureExt;
use uuid::Uuid;

use super::{Shell, ack_held};
use crate::publisher::Write;
use crate::session::{Ending, StateWrite, Written};

impl Shell {
    /// Writes `record` as its session's state: now, or after the write in flight. `last`: the
    /// session's final write; its message is settled once that is durable.
    pub(super) fn write_state(&mut self, record: RequestRecord, last: bool) {
        let id = record.request_id;
        let Some(live) = self.sessions.get_mut(&id) else {
            return;
        };
        let write = StateWrite { record, last };
        if live.writing.is_some() {
            live.next = Some(write);
        } else {
            self.send_state_write(id, write);
        }
    }

    fn send_state_write(&mut self, id: Uuid, write: StateWrite) {
        // What `kv::Store::update` publishes to (the connection uses the default `$JS.API`
        // prefix), but through the ordered writer instead of an awaited put: this
        // substation's own session key, the only one it may write.
        let prefix = self.kv.put_prefix.as_ref().unwrap_or(&self.kv.prefix);
        let subject = format!("{prefix}{}", session_state_key(id, &self.id));
        let Some(live) = self.sessions.get_mut(&id) else {
            return;
        };
        let payload = serde_json::to_vec(&write.record).expect("a RequestRecord serializes");
        let (message, receipt) =
            Write::new(subject, PublishMessage::build().payload(payload.into()))
                .expecting(live.revision)
                .with_receipt();
        live.writing = Some(write);
        self.publisher.send(message);
        self.receipts.push(Box::pin(receipt.map(move |r| {
            let written = match r {
                Ok(Ok(revision)) => Written::Stored(revision),
                Ok(Err(_)) => Written::Fenced,
                Err(_) => Written::Abandoned,
            };
            (id, written)
        })));
    }

    /// A state write is done: next write, settle the session's message after its last, or
    /// find out why it was refused.
    pub(super) async fn on_receipt(&mut self, id: Uuid, written: Written) {
        let Some(live) = self.sessions.get_mut(&id) else {
            return;
        };
        let Some(done) = live.writing.take() else {
            // No state write in flight: the receipt is the completion event's.
            return self.on_announced(id, written).await;
        };
        match written {
            Written::Stored(revision) => {
                live.revision = revision;
                if done.last {
                    self.announce_or_settle(id).await;
                } else if let Some(next) = live.next.take() {
                    self.send_state_write(id, next);
                }
            }
            Written::Fenced => self.on_refused(id, done).await,
            Written::Abandoned if done.last => self.settle(id, false).await,
            Written::Abandoned | Written::Announced => {}
        }
    }

    /// The session's last state is stored: announce its completion (then settle, in
    /// [`Self::on_announced`]), or settle now.
    async fn announce_or_settle(&mut self, id: Uuid) {
        let Some(live) = self.sessions.get_mut(&id) else {
            return;
        };
        let Some(c) = live.completion.take() else {
            return self.settle(id, true).await;
        };
        let live = &self.sessions[&id];
        let (write, receipt) = self
            .event_write(
                live,
                SessionEventKind::Completed,
                c.at,
                c.energy_kwh,
                Some(c.outcome),
            )
            .with_receipt();
        self.publisher.send(write);
        self.receipts.push(Box::pin(receipt.map(move |r| {
            let written = if r.is_ok() {
                Written::Announced
            } else {
                Written::Abandoned
            };
            (id, written)
        })));
    }

    /// A receipt of a session's completion event: settle its message.
    pub(super) async fn on_announced(&mut self, id: Uuid, written: Written) {
        self.settle(id, written == Written::Announced).await;
    }

    /// The final writes of a session are durable (or abandoned): ack or hand back its message.
    async fn settle(&mut self, id: Uuid, durable: bool) {
        let Some(live) = self.sessions.remove(&id) else {
            return;
        };
        match (live.ending, durable) {
            (Some(Ending::Completed), true) => ack_held(&live, AckKind::Ack, "ack").await,
            // Redelivered at once to whichever substation process pulls next: it resumes from
            // the energy just recorded.
            (Some(Ending::Interrupted), true) => ack_held(&live, AckKind::Nak(None), "nak").await,
            // Not recorded: leave the message to its ack wait; a redelivery redoes the ending.
            _ => {
                tracing::warn!(request_id = %id, "final writes of the session were not acknowledged")
            }
        }
    }

    /// A write was refused: the session record is not at the revision the session knew. Reads
    /// it to see whose the request is now (the dispatcher's fence names no substation).
    async fn on_refused(&mut self, id: Uuid, refused: StateWrite) {
        let key = session_state_key(id, &self.id);
        let (record, revision) = match streams::read_state(&self.kv, &key).await {
            Ok(stored) => stored,
            Err(e) => {
                // NATS is away: try the same write again (the writer waits for it to return).
                tracing::warn!(request_id = %id, error = %e, "cannot read a request state after a refused write; writing again");
                self.send_state_write(id, refused);
                return;
            }
        };
        let ours = record
            .as_ref()
            .is_some_and(|r| r.substation_id.as_deref() == Some(self.id.as_str()));
        let finished = record.as_ref().is_some_and(|r| r.state.is_final());
        match (ours, finished) {
            // Our own last write, stored with its ack lost.
            (true, true) if refused.last => self.announce_or_settle(id).await,
            (true, false) => {
                let live = self.sessions.get_mut(&id).expect("held here");
                live.revision = revision;
                let write = live.next.take().unwrap_or(refused);
                self.send_state_write(id, write);
            }
            _ => self.fence(id, record.as_ref()).await,
        }
    }

    /// The request is another's now (moved away while this substation was cut off), or was
    /// finished elsewhere: it stops charging here, without another write.
    async fn fence(&mut self, id: Uuid, now: Option<&RequestRecord>) {
        let Some(live) = self.sessions.remove(&id) else {
            return;
        };
        self.advance_now();
        if let Some((_, events)) = self.station.remove(id) {
            // Its power goes to the others.
            self.apply(events);
        }
        if let Some(ocpp) = &mut self.ocpp {
            ocpp.forget(id);
        }
        self.metrics.sessions_fenced.inc();
        tracing::warn!(
            request_id = %id,
            now_at = now.and_then(|r| r.substation_id.as_deref()).unwrap_or("none"),
            state = ?now.map(|r| r.state),
            "the request moved on without this substation (failover); it stops charging here"
        );
        // Done here for good: the request lives on elsewhere.
        ack_held(&live, AckKind::Ack, "ack").await;
    }
}
