//! What the checker reads from NATS, never from the services' memory: every message of a stream
//! (with the server's timestamp, which places it against the fault's times), the request-state
//! bucket, and the heartbeats as they pass (`EV_TELEMETRY` keeps only the last per substation,
//! so they are watched live for the whole run).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use async_nats::jetstream::{self, kv};
use evgrid_common::nats::read;
use evgrid_model::messages::{Heartbeat, RequestRecord};
use futures::StreamExt;
use uuid::Uuid;

pub use evgrid_common::nats::read::Stored;

/// Attempts at reading a whole stream: a cluster that just lost a node may time out a request
/// or two while it elects new leaders.
const READ_ATTEMPTS: u32 = 5;
/// Pause between two attempts.
const READ_RETRY: Duration = Duration::from_secs(2);

/// Every message `stream` holds, oldest first, through an ordered consumer; tried again (a few
/// times) when the read fails.
pub async fn read_stream(js: &jetstream::Context, stream: &str) -> Result<Vec<Stored>> {
    let mut attempt = 1;
    loop {
        match read::read_stream(js, stream, read::Start::All).await {
            Ok(messages) => return Ok(messages),
            Err(e) if attempt < READ_ATTEMPTS => {
                tracing::warn!(stream, attempt, error = %format!("{:#}", anyhow::Error::from(e)), "cannot read; trying again");
                attempt += 1;
                tokio::time::sleep(READ_RETRY).await;
            }
            Err(e) => {
                return Err(anyhow::Error::from(e).context(format!("{READ_ATTEMPTS} attempts")));
            }
        }
    }
}

/// The request-state bucket.
pub async fn bucket(js: &jetstream::Context) -> Result<kv::Store> {
    Ok(read::bucket(js).await?)
}

/// The records of `ids` in the bucket (absent ids are left out).
pub async fn records(
    kv: &kv::Store,
    ids: impl IntoIterator<Item = Uuid>,
) -> Result<HashMap<Uuid, RequestRecord>> {
    Ok(read::records(kv, ids).await?)
}

/// Every record in the bucket.
pub async fn all_records(kv: &kv::Store) -> Result<HashMap<Uuid, RequestRecord>> {
    let mut keys = kv.keys().await?;
    let mut ids = Vec::new();
    while let Some(key) = keys.next().await {
        if let Ok(id) = key?.parse() {
            ids.push(id);
        }
    }
    records(kv, ids).await
}

/// Heartbeats seen so far, and those above their own capacity.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct HeartbeatCheck {
    pub heartbeats: u64,
    pub above_capacity: u64,
    /// The worst one: (substation, load kW, capacity kW).
    pub worst: Option<(String, f64, f64)>,
}

/// Watches `ev.telemetry.*` until dropped (the client resubscribes after a server restart).
pub struct HeartbeatWatch {
    seen: Arc<Mutex<HeartbeatCheck>>,
    task: tokio::task::JoinHandle<()>,
}

/// A load above capacity by more than this is a violation (floating point, not physics).
const CAPACITY_EPSILON_KW: f64 = 1e-6;

impl HeartbeatWatch {
    pub async fn start(client: &async_nats::Client) -> Result<Self> {
        let mut sub = client
            .subscribe(evgrid_model::subjects::TELEMETRY_ALL)
            .await?;
        let seen = Arc::new(Mutex::new(HeartbeatCheck::default()));
        let into = seen.clone();
        let task = tokio::spawn(async move {
            while let Some(message) = sub.next().await {
                let Ok(h) = serde_json::from_slice::<Heartbeat>(&message.payload) else {
                    continue;
                };
                let mut c = into.lock().expect("not poisoned");
                c.heartbeats += 1;
                let excess = h.load_kw - h.capacity_kw;
                if excess > CAPACITY_EPSILON_KW {
                    c.above_capacity += 1;
                    if c.worst.as_ref().is_none_or(|w| excess > w.1 - w.2) {
                        c.worst = Some((h.substation_id, h.load_kw, h.capacity_kw));
                    }
                }
            }
        });
        Ok(Self { seen, task })
    }

    pub fn finish(self) -> HeartbeatCheck {
        self.task.abort();
        self.seen.lock().expect("not poisoned").clone()
    }
}
