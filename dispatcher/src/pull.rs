//! Pull requests on the dispatcher's durable consumer, made on an inbox of our own: the way
//! request messages enter ingest → **dispatcher** → substation.
//!
//! async-nats' `messages()` stream refills itself and cannot be drained, so on shutdown the
//! messages the server had already sent towards it (up to a whole batch) would sit un-acked for
//! AckWait (30 s) before another instance got them. Here the dispatcher asks for a bounded number
//! of messages (its room plus one window), one pull request at a time, and
//! [`Puller::hand_back`] drains the inbox (UNSUB, then a PING round trip, so everything sent
//! before the UNSUB has arrived) and naks what it finds: a rolling restart delays nothing.

use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::consumer::pull::BatchConfig;
use async_nats::jetstream::{self, AckKind};
use async_nats::{StatusCode, Subject, Subscriber};
use futures::StreamExt;

/// How long the server keeps an unfulfilled pull request.
const EXPIRES: Duration = Duration::from_secs(30);
/// While a pull request waits, the server says it is alive this often.
pub(crate) const IDLE_HEARTBEAT: Duration = Duration::from_secs(1);
/// Silence after which an open pull request is presumed lost (server restarted) and renewed.
pub(crate) const SILENCE_LIMIT: Duration = Duration::from_secs(3);
/// Longest wait for the inbox to drain on shutdown (the connection may be gone).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// What arrived on the inbox.
#[derive(Debug)]
pub(crate) enum Pulled {
    /// A request message to handle (boxed: it is large, the other variants tiny).
    Message(Box<jetstream::Message>),
    /// An idle heartbeat: the pull request is alive.
    Alive,
    /// The pull request ended (expired, or the server ended it); `retry_soon` when the server
    /// refused it for a reason that may last, so asking again at once would spin.
    Ended { retry_soon: bool },
    /// The consumer cannot serve pull requests (deleted, JetStream unavailable): rebuild it.
    Broken(String),
}

/// One inbox and at most one open pull request on it.
pub(crate) struct Puller {
    consumer: PullConsumer,
    context: jetstream::Context,
    inbox: Subject,
    sub: Subscriber,
    /// Messages the open pull request may still bring; `None` when no request is open.
    open: Option<usize>,
}

impl Puller {
    pub(crate) async fn new(
        context: jetstream::Context,
        consumer: PullConsumer,
    ) -> Result<Self, async_nats::Error> {
        let client = context.client();
        let inbox = Subject::from(client.new_inbox());
        let sub = client.subscribe(inbox.clone()).await?;
        Ok(Self {
            consumer,
            context,
            inbox,
            sub,
            open: None,
        })
    }

    /// Whether a pull request is open.
    pub(crate) fn is_open(&self) -> bool {
        self.open.is_some()
    }

    /// Forgets the open pull request (presumed lost), so the next [`Puller::request`] is sent.
    pub(crate) fn forget(&mut self) {
        self.open = None;
    }

    /// Asks for up to `n` messages.
    pub(crate) async fn request(&mut self, n: usize) -> Result<(), async_nats::Error> {
        let batch = BatchConfig {
            batch: n,
            expires: Some(EXPIRES),
            idle_heartbeat: IDLE_HEARTBEAT,
            ..Default::default()
        };
        self.consumer
            .request_batch(batch, self.inbox.clone())
            .await?;
        self.open = Some(n);
        Ok(())
    }

    /// The next thing on the inbox. Cancel-safe.
    pub(crate) async fn next(&mut self) -> Pulled {
        let Some(msg) = self.sub.next().await else {
            return Pulled::Broken("the pull inbox was closed".into());
        };
        match msg.status {
            None | Some(StatusCode::OK) => {
                if let Some(left) = self.open.as_mut() {
                    *left = left.saturating_sub(1);
                    if *left == 0 {
                        self.open = None;
                    }
                }
                Pulled::Message(Box::new(jetstream::Message {
                    message: msg,
                    context: self.context.clone(),
                }))
            }
            Some(StatusCode::IDLE_HEARTBEAT) => Pulled::Alive,
            Some(StatusCode::NO_RESPONDERS) => {
                Pulled::Broken("no responders: JetStream or the consumer is not available".into())
            }
            Some(
                status @ (StatusCode::TIMEOUT
                | StatusCode::REQUEST_TERMINATED
                | StatusCode::NOT_FOUND
                | StatusCode::PIN_ID_MISMATCH),
            ) => {
                let description = msg.description.unwrap_or_default();
                if description.contains("Consumer Deleted")
                    || description.contains("push based")
                    || description.starts_with("Exceeded MaxRequest")
                {
                    return Pulled::Broken(format!("{status}: {description}"));
                }
                self.open = None;
                Pulled::Ended {
                    retry_soon: status != StatusCode::TIMEOUT,
                }
            }
            Some(status) => Pulled::Broken(format!(
                "unexpected status {status} on the pull inbox: {}",
                msg.description.unwrap_or_default()
            )),
        }
    }

    /// Stops the inbox and naks, without delay, every request message that reached it but was
    /// not handled, so the server redelivers them now (to this or another instance) instead of
    /// after AckWait. Returns how many were handed back.
    pub(crate) async fn hand_back(mut self) -> usize {
        if self.sub.drain().await.is_err() {
            return 0;
        }
        let mut returned = 0;
        let drain = async {
            while let Some(msg) = self.sub.next().await {
                if matches!(msg.status, None | Some(StatusCode::OK)) {
                    let msg = jetstream::Message {
                        message: msg,
                        context: self.context.clone(),
                    };
                    if let Err(e) = msg.ack_with(AckKind::Nak(None)).await {
                        tracing::warn!(error = %e, "cannot hand back a request message; it comes back after the ack wait");
                    }
                    returned += 1;
                }
            }
        };
        let _ = tokio::time::timeout(DRAIN_TIMEOUT, drain).await;
        returned
    }
}
