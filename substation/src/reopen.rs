//! A JetStream message stream that reopens itself: the shape every consumer of the substation
//! stage (its dispatches on `ev.dispatch.<id>`, its limits on `ev.limits.<id>`) shares. When the
//! stream fails or ends (a server restart, a deleted consumer) it is opened again, with backoff
//! (100 ms doubling to 2 s), for ever: the substation never exits for a NATS outage.

use std::fmt::Display;
use std::time::Duration;

use async_nats::jetstream;
use futures::{Stream, StreamExt};
use tokio::time::Instant;

const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// The message stream of one consumer, and when to try opening it again.
pub(crate) struct Reopening<S> {
    /// What the consumer is, for logs ("dispatch consumer").
    what: &'static str,
    messages: Option<S>,
    retry_at: Instant,
    backoff: Duration,
}

impl<S, E> Reopening<S>
where
    S: Stream<Item = Result<jetstream::Message, E>> + Unpin,
    E: Display,
{
    pub fn new(what: &'static str) -> Self {
        Self {
            what,
            messages: None,
            retry_at: Instant::now(),
            backoff: BACKOFF_FIRST,
        }
    }

    /// The next message, opening the stream with `open` whenever there is none. Cancel-safe:
    /// an opening interrupted by another branch of a `select!` starts again on the next call.
    pub async fn next<F, Fut>(&mut self, mut open: F) -> jetstream::Message
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<S, async_nats::Error>>,
    {
        loop {
            if let Some(messages) = &mut self.messages {
                match messages.next().await {
                    Some(Ok(msg)) => {
                        self.backoff = BACKOFF_FIRST;
                        return msg;
                    }
                    Some(Err(e)) => tracing::warn!(error = %e, "{} failed; rebuilding", self.what),
                    None => tracing::warn!("{} ended; rebuilding", self.what),
                }
                self.messages = None;
                self.fail();
            }
            tokio::time::sleep_until(self.retry_at).await;
            match open().await {
                Ok(messages) => self.messages = Some(messages),
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?self.backoff, "cannot open the {} yet", self.what);
                    self.fail();
                }
            }
        }
    }

    /// The open stream, if any, taken out (the next [`Reopening::next`] opens a new one).
    pub fn take(&mut self) -> Option<S> {
        self.messages.take()
    }

    fn fail(&mut self) {
        self.retry_at = Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
    }
}
