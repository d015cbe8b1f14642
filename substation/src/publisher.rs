//! The substation's one ordered writer to JetStream: session events, request states and
//! heartbeats all go through a single task that publishes them in the order they were queued,
//! pipelining PubAcks, so a request's states reach `EV_REQUEST_STATE` in order (states never go
//! backwards) and a caller learns when a write, and everything queued before it, is durable.
//!
//! A failed or timed-out PubAck (NATS restarting) makes the task publish that write and every
//! later in-flight one again, in order, after a backoff: a key's last stored value is always its
//! newest. Session events carry a `Nats-Msg-Id`, so a repeat inside the duplicate window is
//! stored once.
//!
//! A write may be a compare-and-set ([`Write::expecting`]): stored only if its subject's last
//! sequence (a state key's revision) is the one expected. One the server refuses for that is
//! not retried; its receipt says [`Rejected`] and the writer goes on with the others: the
//! caller decides (the state moved on without it: fencing).

use std::collections::VecDeque;
use std::pin::Pin;

use async_nats::jetstream::context::{PublishError, PublishErrorKind};
use async_nats::jetstream::{self, message::PublishMessage};
use evgrid_common::backoff::Backoff;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// Writes sent but not yet acknowledged, at most; beyond it queueing waits (backpressure).
const MAX_IN_FLIGHT: usize = 256;

/// A compare-and-set write the server refused: its subject's last sequence was not the one
/// expected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("refused: the subject has moved past the expected revision")]
pub struct Rejected;

/// What a receipt reports: the write's stream sequence once it and every write queued before
/// it are acknowledged, or that the server refused the compare-and-set.
pub type Receipt = oneshot::Receiver<Result<u64, Rejected>>;

/// One JetStream publish, and who wants to know when it is durable.
#[derive(Debug)]
pub struct Write {
    pub subject: String,
    pub message: PublishMessage,
    /// Compare-and-set: the subject's last sequence must be this (0: no message yet).
    pub expected_last: Option<u64>,
    /// Fired once the write and every write queued before it are acknowledged, or refused.
    pub durable: Option<oneshot::Sender<Result<u64, Rejected>>>,
}

impl Write {
    pub fn new(subject: String, message: PublishMessage) -> Self {
        Self {
            subject,
            message,
            expected_last: None,
            durable: None,
        }
    }

    /// This write as a compare-and-set on its subject's last sequence, `revision`.
    pub fn expecting(mut self, revision: u64) -> Self {
        self.expected_last = Some(revision);
        self
    }

    /// This write, reporting on the returned receiver when it is durable.
    pub fn with_receipt(mut self) -> (Self, Receipt) {
        let (tx, rx) = oneshot::channel();
        self.durable = Some(tx);
        (self, rx)
    }
}

/// The handle that queues writes. Dropping every handle lets the task finish what it holds and
/// return.
#[derive(Clone, Debug)]
pub struct Publisher {
    tx: mpsc::UnboundedSender<Write>,
}

impl Publisher {
    /// Starts the writer task on `js`.
    pub fn start(js: jetstream::Context) -> (Self, JoinHandle<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Self { tx }, tokio::spawn(run(js, rx)))
    }

    /// Queues `write` behind every earlier one.
    pub fn send(&self, write: Write) {
        if self.tx.send(write).is_err() {
            // Only after the task ended, which happens when every handle is gone: unreachable
            // while a caller holds `self`, unless the task panicked.
            tracing::error!("publisher task is gone; write dropped");
        }
    }
}

type AckFuture =
    Pin<Box<dyn Future<Output = Result<jetstream::publish::PublishAck, PublishError>> + Send>>;

struct InFlight {
    write: Write,
    ack: AckFuture,
}

async fn run(js: jetstream::Context, mut rx: mpsc::UnboundedReceiver<Write>) {
    let mut in_flight: VecDeque<InFlight> = VecDeque::new();
    let mut open = true;
    let mut backoff = Backoff::default();
    while open || !in_flight.is_empty() {
        tokio::select! {
            // Acks first: they free room and fire receipts.
            biased;
            ack = async { (&mut in_flight.front_mut().expect("non-empty").ack).await },
                if !in_flight.is_empty() =>
            {
                match ack {
                    Ok(ack) => {
                        backoff.reset();
                        let done = in_flight.pop_front().expect("non-empty");
                        if let Some(tx) = done.write.durable {
                            let _ = tx.send(Ok(ack.sequence));
                        }
                    }
                    Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => {
                        let refused = in_flight.pop_front().expect("non-empty");
                        tracing::debug!(subject = %refused.write.subject, "compare-and-set write refused");
                        if let Some(tx) = refused.write.durable {
                            let _ = tx.send(Err(Rejected));
                        }
                    }
                    Err(e) => {
                        let writes: Vec<Write> = in_flight.drain(..).map(|f| f.write).collect();
                        let wait = backoff.next_delay();
                        tracing::warn!(
                            error = %e,
                            subject = %writes[0].subject,
                            pending = writes.len(),
                            retry_in = ?wait,
                            "JetStream write not acknowledged; publishing again in order"
                        );
                        tokio::time::sleep(wait).await;
                        for write in writes {
                            in_flight.push_back(publish(&js, write).await);
                        }
                    }
                }
            }
            write = rx.recv(), if open && in_flight.len() < MAX_IN_FLIGHT => match write {
                Some(write) => in_flight.push_back(publish(&js, write).await),
                None => open = false,
            },
        }
    }
}

/// Sends one write. A send that fails at once (connection closed) becomes a failed ack, so the
/// retry path handles both alike.
async fn publish(js: &jetstream::Context, write: Write) -> InFlight {
    let mut message = write.message.clone();
    if let Some(revision) = write.expected_last {
        message = message.expected_last_subject_sequence(revision);
    }
    let ack: AckFuture = match js.send_publish(write.subject.clone(), message).await {
        Ok(ack) => Box::pin(std::future::IntoFuture::into_future(ack)),
        Err(e) => Box::pin(std::future::ready(Err(e))),
    };
    InFlight { write, ack }
}
