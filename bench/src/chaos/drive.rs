//! The chaos suite's load, at the front of ingest → dispatcher → substation: an open loop of
//! `POST /v1/charge-requests` (request `i` due at `i / rate` whatever happened to the others,
//! the mix, schedule and ids of `evgrid load`), each with an `Idempotency-Key`. A POST that fails
//! (no connection, a timeout, a 503) is sent again with the same key until it is answered, or
//! given up [`RETRY_GRACE`] after the load phase, as a careful client would: so a fault shows as
//! retries and 503s, and every 202 is a request the grid owes an outcome. With several ingests the load spreads over them,
//! request `i` first to ingest `i mod n`, each retry to the next one, as a client behind a
//! round-robin balancer with retries would see it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, Result};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use evgrid::load::dist::Distribution;
use evgrid::load::plan::{Mix, RunIds, Schedule, encode};
use evgrid_common::backoff::Backoff;
use reqwest::StatusCode;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

/// Bound on one POST: long enough for a loaded ingest, short enough that a hung connection to
/// a dead process is given up and retried soon.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
/// Retries start this soon after a failure (then double, up to [`RETRY_MAX`]): a recovery shows
/// within a tenth of a second, and a long outage is not flooded.
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(1);
/// How long after the load phase a request still unanswered is retried: past the longest
/// outage of the suite (a NATS leader election after a kill -9 takes 4–9 s, a restarted cluster
/// a few more), so a fault near the end of the load shows as a late 202, not a lost request.
pub const RETRY_GRACE: Duration = Duration::from_secs(20);

/// What the load sends.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    pub rate: f64,
    pub duration: Duration,
    /// Energy per request, `evgrid load` syntax (`uniform:5..30`).
    pub energy_kwh: String,
    /// Car max power, `evgrid load` syntax.
    pub max_power_kw: String,
    pub seed: u64,
}

/// One 202.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Accepted {
    pub request_id: Uuid,
    /// When its first POST was sent.
    pub sent: DateTime<Utc>,
    /// When the 202 arrived.
    pub at: DateTime<Utc>,
    /// POSTs it took (1 when the first was answered).
    pub attempts: u32,
}

/// What the load saw.
#[derive(Debug, Default, serde::Serialize)]
pub struct LoadOutcome {
    /// Requests due in the load phase.
    pub requests: u64,
    /// Every 202, in the order they arrived (counted in the JSON, not listed).
    #[serde(skip)]
    pub accepted: Vec<Accepted>,
    /// 503 answers (ingest could not store the request).
    pub status_503: u64,
    /// POSTs that got no answer: no connection, reset, or no answer within the attempt timeout.
    pub connection_errors: u64,
    /// Requests given up without a 202, [`RETRY_GRACE`] after the load phase.
    pub unanswered: u64,
    /// Answers other than 202 and 503 (a client error here is a bug of the suite or of ingest),
    /// by status.
    pub other_status: BTreeMap<u16, u64>,
}

/// Sends the load at `urls` (the ingests' base URLs) and returns when every request is answered
/// or given up.
pub async fn drive(urls: &[String], spec: &LoadSpec) -> Result<LoadOutcome> {
    anyhow::ensure!(!urls.is_empty(), "no ingest to send to");
    let mix = Mix::Random {
        energy_kwh: Distribution::parse(&spec.energy_kwh, 0.1, 200.0)
            .map_err(anyhow::Error::msg)
            .context("energy")?,
        max_power_kw: Distribution::parse(&spec.max_power_kw, 1.0, 400.0)
            .map_err(anyhow::Error::msg)
            .context("max power")?,
        departure_hours: None,
        seed: spec.seed,
    };
    let schedule = Schedule::open(spec.rate, spec.duration);
    let ids = RunIds::new(Uuid::new_v4().as_u128());
    let endpoints: Arc<Vec<String>> = Arc::new(
        urls.iter()
            .map(|url| format!("{url}/v1/charge-requests"))
            .collect(),
    );
    let client = reqwest::Client::builder()
        .timeout(ATTEMPT_TIMEOUT)
        .build()
        .context("no HTTP client")?;
    let outcome = Arc::new(Mutex::new(LoadOutcome {
        requests: schedule.requests(),
        ..Default::default()
    }));
    let start = Instant::now();
    let give_up = start + spec.duration + RETRY_GRACE;
    let tasks = TaskTracker::new();
    for i in 0..schedule.requests() {
        let due = start + schedule.due(i).unwrap_or_default();
        tokio::time::sleep_until(due).await;
        let id = ids.id(i);
        let mut buf = Vec::new();
        encode(&mut buf, id, i, &mix.spec(i), Utc::now());
        let body = Bytes::from(buf);
        let (outcome, client, endpoints) = (outcome.clone(), client.clone(), endpoints.clone());
        let sent = Utc::now();
        tasks.spawn(async move {
            let mut backoff = Backoff::new(RETRY_FIRST, RETRY_MAX);
            let mut attempts = 0;
            loop {
                let endpoint = &endpoints[(i as usize + attempts as usize) % endpoints.len()];
                attempts += 1;
                let attempt = client
                    .post(endpoint)
                    .header("Idempotency-Key", id.to_string())
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(body.clone())
                    .send()
                    .await;
                {
                    let mut o = outcome.lock().expect("not poisoned");
                    match attempt.map(|r| r.status()) {
                        Ok(StatusCode::ACCEPTED) => {
                            o.accepted.push(Accepted {
                                request_id: id,
                                sent,
                                at: Utc::now(),
                                attempts,
                            });
                            return;
                        }
                        Ok(StatusCode::SERVICE_UNAVAILABLE) => o.status_503 += 1,
                        Ok(other) => {
                            *o.other_status.entry(other.as_u16()).or_default() += 1;
                            return;
                        }
                        Err(_) => o.connection_errors += 1,
                    }
                }
                let retry_at = Instant::now() + backoff.next_delay();
                if retry_at >= give_up {
                    outcome.lock().expect("not poisoned").unanswered += 1;
                    return;
                }
                tokio::time::sleep_until(retry_at).await;
            }
        });
    }
    tasks.close();
    tasks.wait().await;
    let outcome = std::mem::take(&mut *outcome.lock().expect("not poisoned"));
    Ok(outcome)
}
