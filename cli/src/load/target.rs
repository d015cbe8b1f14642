//! Where `evgrid load` sends requests, at the entry of ingest → dispatcher → substation: ingest's
//! HTTP API, or `ev.requests` on NATS directly (a JetStream publish awaiting the PubAck, as
//! `nats pub -J` would, or a plain core publish). Each send returns accepted or a classified
//! error.

use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{self, context::PublishErrorKind, message::PublishMessage};
use bytes::Bytes;
use evgrid_model::messages::{OwnerTag, owner_tag};
use evgrid_model::subjects;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use uuid::Uuid;

use super::stats::{ErrorKind, SendError};

/// The path of the charge-request API under `--url`.
pub const API_PATH: &str = "v1/charge-requests";

/// A connected target.
#[derive(Debug, Clone)]
pub enum Target {
    /// `POST {url}/v1/charge-requests`, each request on the next of `endpoints` (ingest
    /// replicas), with its id as `Idempotency-Key`.
    Http {
        client: reqwest::Client,
        endpoints: Vec<reqwest::Url>,
        /// Whether `client` sends an API key.
        keyed: bool,
    },
    /// JetStream publish to `ev.requests` with `Nats-Msg-Id` = request id, awaiting the PubAck.
    JetStream(jetstream::Context),
    /// Core publish to `ev.requests`: accepted once handed to the client (no PubAck).
    Core(async_nats::Client),
}

impl Target {
    /// An HTTP target over `bases` (ingest replicas) with a pool of up to `connections`
    /// kept-alive connections each.
    pub fn http(
        bases: &[reqwest::Url],
        connections: usize,
        api_key: Option<&str>,
    ) -> anyhow::Result<Self> {
        let endpoints = bases
            .iter()
            .map(|base| {
                base.join(API_PATH)
                    .map_err(|e| anyhow::anyhow!("cannot build the API URL from {base}: {e}"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        anyhow::ensure!(!endpoints.is_empty(), "no --url");
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(key) = api_key {
            let mut value = HeaderValue::try_from(format!("Bearer {key}"))
                .map_err(|_| anyhow::anyhow!("the API key is not a valid header value"))?;
            value.set_sensitive(true);
            headers.insert(AUTHORIZATION, value);
        }
        // No redirects or retries: a load tool reports what the target answered, once.
        let client = reqwest::Client::builder()
            .default_headers(headers)
            .redirect(reqwest::redirect::Policy::none())
            .retry(reqwest::retry::never())
            .pool_max_idle_per_host(connections)
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_nodelay(true)
            .build()?;
        Ok(Target::Http {
            client,
            endpoints,
            keyed: api_key.is_some(),
        })
    }

    /// The owner tag of the ids the target makes for this client's API key
    /// (`GET /v1/api-key`), when it has one; a key the target refuses stops the run here.
    pub async fn owner_tag(&self) -> anyhow::Result<Option<OwnerTag>> {
        let Target::Http {
            client,
            endpoints,
            keyed: true,
        } = self
        else {
            return Ok(None);
        };
        // `{base}/v1/charge-requests` → `{base}/v1/api-key`.
        let url = endpoints[0].join("api-key")?;
        let response = client
            .get(url.clone())
            .send()
            .await
            .with_context(|| format!("GET {url}"))?;
        let status = response.status();
        let body: serde_json::Value = response
            .json()
            .await
            .with_context(|| format!("GET {url} answered {status}, not JSON"))?;
        if !status.is_success() {
            anyhow::bail!(
                "{url} refused the API key ({status}): {}; give one with --api-key or --api-key-file",
                body["detail"].as_str().unwrap_or("no detail")
            );
        }
        let Some(prefix) = body["request_id_prefix"].as_str() else {
            return Ok(None);
        };
        let id =
            Uuid::parse_str(&format!("{prefix}-0000-0000-000000000000")).with_context(|| {
                format!("{url}: request_id_prefix {prefix:?} is not a UUID's start")
            })?;
        Ok(Some(owner_tag(id)))
    }

    /// Sends one request body: request `i`'s `attempt`-th send (0 first), which for HTTP picks
    /// the replica, so a retry goes to another. The caller bounds the wait (`--timeout`).
    pub async fn send(&self, id: Uuid, body: Bytes, i: u64, attempt: u32) -> Result<(), SendError> {
        match self {
            Target::Http {
                client, endpoints, ..
            } => {
                let n = endpoints.len() as u64;
                let endpoint = &endpoints[((i + u64::from(attempt)) % n) as usize];
                let response = client
                    .post(endpoint.clone())
                    .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
                    // The body names the same id: a resend (--retry-for) is stored once.
                    .header("Idempotency-Key", id.to_string())
                    .body(body)
                    .send()
                    .await
                    .map_err(classify_reqwest)?;
                let status = response.status();
                // Read the (small) body so the connection goes back to the pool.
                let text = response.bytes().await.map_err(classify_reqwest)?;
                if status.is_success() {
                    return Ok(());
                }
                let kind = if status.is_client_error() {
                    ErrorKind::Http4xx
                } else if status.is_server_error() {
                    ErrorKind::Http5xx
                } else {
                    ErrorKind::HttpOther
                };
                let snippet = String::from_utf8_lossy(&text[..text.len().min(300)]).into_owned();
                Err(SendError::new(kind, format!("{status}: {snippet}")))
            }
            Target::JetStream(js) => {
                let mut uuid = [0u8; uuid::fmt::Hyphenated::LENGTH];
                let id = id.hyphenated().encode_lower(&mut uuid);
                let ack = js
                    .send_publish(
                        subjects::REQUESTS,
                        PublishMessage::build().payload(body).message_id(&*id),
                    )
                    .await
                    .map_err(classify_publish)?;
                ack.await.map_err(classify_publish)?;
                Ok(())
            }
            Target::Core(client) => client
                .publish(subjects::REQUESTS, body)
                .await
                .map_err(|e| SendError::new(ErrorKind::Nats, e.to_string())),
        }
    }

    /// Waits until everything published is on the wire (core publishes are buffered).
    pub async fn flush(&self) -> Result<(), SendError> {
        match self {
            Target::Core(client) => client
                .flush()
                .await
                .map_err(|e| SendError::new(ErrorKind::Nats, e.to_string())),
            _ => Ok(()),
        }
    }
}

fn classify_reqwest(e: reqwest::Error) -> SendError {
    let kind = if e.is_timeout() {
        ErrorKind::Timeout
    } else if e.is_connect() {
        ErrorKind::Connect
    } else {
        ErrorKind::Transport
    };
    // The chain (e.g. "connection refused") is what tells the user what went wrong.
    SendError::new(kind, format!("{:#}", anyhow::Error::new(e)))
}

fn classify_publish(e: jetstream::context::PublishError) -> SendError {
    let kind = match e.kind() {
        PublishErrorKind::TimedOut => ErrorKind::Timeout,
        _ => ErrorKind::Nats,
    };
    SendError::new(kind, e.to_string())
}
