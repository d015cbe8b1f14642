//! The intake of a durable pull consumer: how request messages enter the dispatcher
//! (`EV_REQUESTS`, consumer `dispatcher`) and dispatch messages enter a substation
//! (`EV_DISPATCH`, consumer `substation-<id>`).
//!
//! One shape for both: pull requests on an inbox of our own, for as many messages as the caller
//! has room for plus one window ahead, so the next messages are already here when room frees
//! rather than a round trip away. The consumer is opened (created, or its settings rolled
//! forward by [`super::consumer::ensure`]) and rebuilt with [`Backoff`] whenever it breaks; an
//! open pull request is renewed at once when the client reconnects (a restarted server has
//! forgotten it) or when the server has been silent for [`SILENCE_LIMIT`].
//!
//! async-nats' own `messages()` stream refills itself and cannot be drained, so on shutdown the
//! messages the server had already sent towards it would sit un-acked for the whole ack wait
//! before anyone else got them. [`Intake::close`] drains the inbox instead (UNSUB, then a PING
//! round trip, so everything sent before the UNSUB has arrived) and gives those messages back to
//! the caller, who hands them back ([`hand_back`]) or keeps what it still holds.

use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::consumer::pull::{self, BatchConfig};
use async_nats::jetstream::{self, AckKind};
use async_nats::{StatusCode, Subject, Subscriber};
use futures::StreamExt;
use tokio::sync::watch;
use tokio::time::{Instant, sleep_until};

use super::Nats;
use crate::backoff::Backoff;

/// How long the server keeps an unfulfilled pull request, unless [`Intake::with_pull_expiry`]
/// says otherwise.
const EXPIRES: Duration = Duration::from_secs(30);
/// While a pull request waits, the server says it is alive this often.
const IDLE_HEARTBEAT: Duration = Duration::from_secs(1);
/// Silence after which an open pull request is presumed lost (server restarted) and renewed.
pub const SILENCE_LIMIT: Duration = Duration::from_secs(3);
/// Pause before asking again after the server refused a pull request for a reason that may
/// last, so asking again at once would spin.
const REQUEST_RETRY: Duration = Duration::from_millis(100);
/// Longest wait for the inbox to drain on close (the connection may be gone).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// A durable pull consumer's messages, for a caller that holds at most a bounded number at once.
pub struct Intake {
    nats: Nats,
    stream: String,
    config: pull::Config,
    /// For logs: "request consumer", "dispatch consumer".
    what: &'static str,
    /// Messages asked for beyond the caller's room.
    window: usize,
    /// Ask again only once at least this much room is free: fewer, fuller pull requests.
    low_water: usize,
    /// How long the server keeps each pull request.
    expires: Duration,
    puller: Option<Puller>,
    backoff: Backoff,
    open_at: Instant,
    request_at: Instant,
    silence_until: Instant,
    connection: watch::Receiver<bool>,
}

impl Intake {
    /// The intake of the durable consumer `config` on `stream`, asking for `window` messages
    /// beyond the caller's room. Nothing is opened before the first [`Intake::next`].
    pub fn new(
        nats: &Nats,
        stream: &str,
        config: pull::Config,
        what: &'static str,
        window: usize,
    ) -> Self {
        let now = Instant::now();
        let mut connection = nats.connection();
        connection.mark_unchanged();
        Self {
            nats: nats.clone(),
            stream: stream.to_owned(),
            config,
            what,
            window: window.max(1),
            low_water: (window / 4).max(1),
            expires: EXPIRES,
            puller: None,
            backoff: Backoff::default(),
            open_at: now,
            request_at: now,
            silence_until: now + SILENCE_LIMIT,
            connection,
        }
    }

    /// Pull requests that expire after `expires` (at least two idle heartbeats, as the server
    /// requires) instead of 30 s. While a process is frozen its open pull request stays valid,
    /// and the server goes on handing it messages, even the ones the ack wait took back from
    /// it: a short expiry bounds that, for a consumer whose instances should take over from one
    /// another within seconds.
    pub fn with_pull_expiry(mut self, expires: Duration) -> Self {
        self.expires = expires.max(2 * IDLE_HEARTBEAT);
        self
    }

    /// Work of the caller's own is going on: the server's silence meanwhile is not a lost pull
    /// request.
    pub fn busy(&mut self) {
        self.silence_until = Instant::now() + SILENCE_LIMIT;
    }

    /// The next message, when the caller has room for `room` more (at least 1). Waits for as
    /// long as it takes, rebuilding the consumer when it breaks. Cancel-safe: a message that
    /// arrives after cancellation waits in the inbox for the next call.
    pub async fn next(&mut self, room: usize) -> jetstream::Message {
        loop {
            if self.puller.is_none() {
                sleep_until(self.open_at).await;
                match self.open().await {
                    Ok(puller) => {
                        self.puller = Some(puller);
                        self.busy();
                    }
                    Err(e) => {
                        let wait = self.backoff.next_delay();
                        tracing::warn!(error = %e, retry_in = ?wait, "cannot open the {} yet", self.what);
                        self.open_at = Instant::now() + wait;
                        continue;
                    }
                }
            }
            let puller = self.puller.as_mut().expect("opened above");
            let now = Instant::now();
            if !puller.is_open() && now >= self.request_at && room >= self.low_water {
                if let Err(e) = puller.request(room + self.window, self.expires).await {
                    self.broken(format!("cannot send a pull request: {e}"))
                        .await;
                    continue;
                }
                self.silence_until = Instant::now() + SILENCE_LIMIT;
            }
            let open = puller.is_open();
            let retrying = !open && Instant::now() < self.request_at;
            tokio::select! {
                biased;
                pulled = puller.next() => {
                    self.silence_until = Instant::now() + SILENCE_LIMIT;
                    match pulled {
                        Pulled::Message(msg) => {
                            self.backoff.reset();
                            return *msg;
                        }
                        Pulled::Alive => {}
                        Pulled::Ended { retry_soon } => {
                            if retry_soon {
                                self.request_at = Instant::now() + REQUEST_RETRY;
                            }
                        }
                        Pulled::Broken(reason) => self.broken(reason).await,
                    }
                }
                Ok(()) = self.connection.changed() => {
                    // A restarted server has forgotten the open pull request: ask again now
                    // rather than after the silence limit. (Were it still there, the extra
                    // messages would only wait in the inbox.)
                    if *self.connection.borrow_and_update() && open {
                        tracing::debug!("reconnected; renewing the pull request of the {}", self.what);
                        puller.forget();
                    }
                }
                _ = sleep_until(self.request_at), if retrying => {}
                _ = sleep_until(self.silence_until), if open => {
                    // No message and no heartbeat: the server lost the request (it restarted).
                    tracing::debug!("pull request of the {} went silent; asking again", self.what);
                    puller.forget();
                }
            }
        }
    }

    /// Stops pulling and returns the messages that reached this process but were not handed out
    /// yet, for the caller to hand back or keep.
    pub async fn close(mut self) -> Vec<jetstream::Message> {
        match self.puller.take() {
            Some(puller) => puller.close().await,
            None => Vec::new(),
        }
    }

    async fn open(&self) -> Result<Puller, async_nats::Error> {
        let consumer = super::consumer::ensure(&self.nats.js, &self.stream, &self.config).await?;
        Puller::new(self.nats.js.clone(), consumer).await
    }

    /// The consumer cannot serve pull requests: hand back what reached us and open it again
    /// after a backoff.
    async fn broken(&mut self, reason: String) {
        let wait = self.backoff.next_delay();
        tracing::warn!(%reason, retry_in = ?wait, "{} failed; rebuilding it", self.what);
        if let Some(puller) = self.puller.take() {
            let returned = hand_back(puller.close().await).await;
            if returned > 0 {
                tracing::info!(returned, "handed back messages not started");
            }
        }
        self.open_at = Instant::now() + wait;
    }
}

/// Naks `messages` without delay, so the server redelivers them now (to this or another
/// instance) instead of after the ack wait. Returns how many.
pub async fn hand_back(messages: Vec<jetstream::Message>) -> usize {
    let count = messages.len();
    for msg in messages {
        if let Err(e) = msg.ack_with(AckKind::Nak(None)).await {
            tracing::warn!(error = %e, "cannot hand back a message; it comes back after the ack wait");
        }
    }
    count
}

/// What arrived on the inbox.
#[derive(Debug)]
enum Pulled {
    /// A message to hand out (boxed: it is large, the other variants tiny).
    Message(Box<jetstream::Message>),
    /// An idle heartbeat: the pull request is alive.
    Alive,
    /// The pull request ended (expired, or the server ended it); `retry_soon` when the server
    /// refused it for a reason that may last.
    Ended { retry_soon: bool },
    /// The consumer cannot serve pull requests (deleted, JetStream unavailable): rebuild it.
    Broken(String),
}

/// One inbox and at most one open pull request on it.
struct Puller {
    consumer: PullConsumer,
    context: jetstream::Context,
    inbox: Subject,
    sub: Subscriber,
    /// Messages the open pull request may still bring; `None` when no request is open.
    open: Option<usize>,
}

impl Puller {
    async fn new(
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

    fn is_open(&self) -> bool {
        self.open.is_some()
    }

    /// Forgets the open pull request (presumed lost), so the next request is sent.
    fn forget(&mut self) {
        self.open = None;
    }

    async fn request(&mut self, n: usize, expires: Duration) -> Result<(), async_nats::Error> {
        let batch = BatchConfig {
            batch: n,
            expires: Some(expires),
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
    async fn next(&mut self) -> Pulled {
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

    /// Stops the inbox and returns every message that reached it but was not handed out.
    async fn close(mut self) -> Vec<jetstream::Message> {
        if self.sub.drain().await.is_err() {
            return Vec::new();
        }
        let mut messages = Vec::new();
        let drain = async {
            while let Some(msg) = self.sub.next().await {
                if matches!(msg.status, None | Some(StatusCode::OK)) {
                    messages.push(jetstream::Message {
                        message: msg,
                        context: self.context.clone(),
                    });
                }
            }
        };
        let _ = tokio::time::timeout(DRAIN_TIMEOUT, drain).await;
        messages
    }
}
