//! Ordered consumers that heal themselves: how every component follows a stream it only reads
//! (heartbeats on `EV_TELEMETRY` for the dispatcher, ingest and `evgrid up`'s live line; a
//! substation's grid-operator limits on `EV_LIMITS`; `evgrid load`'s session events).
//!
//! An ordered consumer keeps no server-side state worth keeping, and dies with the server that
//! holds it. [`OrderedFeed`] rebuilds it with [`Backoff`] when it fails, and at once when the
//! client reconnects, rather than when a timeout finally notices that the old one is gone: a
//! restarted server is followed again within moments of its return.

use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use futures::StreamExt;
use tokio::sync::watch;
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;

use super::Nats;
use crate::backoff::Backoff;

/// Longest a pull request of an ordered consumer lasts. async-nats asks for 30 s with an idle
/// heartbeat every 15 s, and notices a lost pull request (its stream's leader died) only after
/// two missed heartbeats: when a cluster node died for good, the dispatcher's heartbeat feed
/// stood still for 30 s and nothing was dispatched ("no substation up"). Capping the expiry
/// caps the heartbeat at half of it, so a lost request is noticed, and the consumer rebuilt on
/// the new leader, within seconds.
const MAX_EXPIRES: Duration = Duration::from_secs(4);

/// The messages of an ordered consumer on one stream, rebuilt from `config(next)` whenever it
/// fails or the client reconnects; `next` is the stream sequence after the last message handed
/// out (0 before any), so a rebuilt consumer can resume or start over, as the caller prefers.
pub struct OrderedFeed<F> {
    js: jetstream::Context,
    stream: String,
    config: F,
    /// For logs: "heartbeat feed", "limit consumer".
    what: &'static str,
    messages: Option<consumer::pull::Ordered>,
    next: u64,
    backoff: Backoff,
    open_at: Instant,
    connection: watch::Receiver<bool>,
    watching: bool,
}

impl<F> OrderedFeed<F>
where
    F: FnMut(u64) -> consumer::pull::OrderedConfig,
{
    pub fn new(nats: &Nats, stream: &str, what: &'static str, config: F) -> Self {
        let mut connection = nats.connection();
        connection.mark_unchanged();
        Self {
            js: nats.js.clone(),
            stream: stream.to_owned(),
            config,
            what,
            messages: None,
            next: 0,
            backoff: Backoff::default(),
            open_at: Instant::now(),
            connection,
            watching: true,
        }
    }

    /// The next message, waiting for as long as it takes. Cancel-safe.
    pub async fn next(&mut self) -> jetstream::Message {
        loop {
            if let Some(messages) = &mut self.messages {
                tokio::select! {
                    biased;
                    changed = self.connection.changed(), if self.watching => {
                        match changed {
                            Ok(()) if *self.connection.borrow_and_update() => {
                                // The server may have restarted and forgotten this consumer.
                                tracing::debug!("reconnected; rebuilding the {}", self.what);
                                self.messages = None;
                                self.open_at = Instant::now();
                            }
                            Ok(()) => {}
                            // The client is gone for good: only failures rebuild now.
                            Err(_) => self.watching = false,
                        }
                        continue;
                    }
                    item = messages.next() => match item {
                        Some(Ok(msg)) => {
                            self.backoff.reset();
                            if let Ok(info) = msg.info() {
                                self.next = info.stream_sequence + 1;
                            }
                            return msg;
                        }
                        Some(Err(e)) => tracing::warn!(error = %e, "{} failed; rebuilding", self.what),
                        None => tracing::warn!("{} ended; rebuilding", self.what),
                    }
                }
                self.messages = None;
                self.open_at = Instant::now() + self.backoff.next_delay();
            }
            sleep_until(self.open_at).await;
            match self.open().await {
                Ok(messages) => self.messages = Some(messages),
                Err(e) => {
                    let wait = self.backoff.next_delay();
                    tracing::warn!(error = %e, retry_in = ?wait, "cannot open the {} yet", self.what);
                    self.open_at = Instant::now() + wait;
                }
            }
        }
    }

    async fn open(&mut self) -> Result<consumer::pull::Ordered, async_nats::Error> {
        let mut config = (self.config)(self.next);
        if config.max_expires.is_zero() {
            config.max_expires = MAX_EXPIRES;
        }
        let stream = self.js.get_stream_no_info(&self.stream).await?;
        Ok(stream.create_consumer(config).await?.messages().await?)
    }
}

/// Calls `on` for every message of an [`OrderedFeed`] until `stop`.
pub async fn follow_ordered(
    nats: &Nats,
    stream: &str,
    what: &'static str,
    config: impl FnMut(u64) -> consumer::pull::OrderedConfig,
    stop: &CancellationToken,
    mut on: impl FnMut(&jetstream::Message),
) {
    let mut feed = OrderedFeed::new(nats, stream, what, config);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            msg = feed.next() => on(&msg),
        }
    }
}
