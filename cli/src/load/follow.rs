//! `--wait-complete`: follows what happens to the run's requests at the far end of ingest →
//! dispatcher → substation, by watching the streams once for all requests (never polling each
//! id): session events (`ev.sessions.*.*`, stream `EV_SESSIONS`), rejections (`ev.rejected`,
//! `EV_REJECTED`) and heartbeats (`ev.telemetry.*`).
//!
//! The followers start before the first request is sent, at the streams' current end, so no
//! event of the run is missed; when a consumer fails (server restart) it is rebuilt from the
//! last sequence seen.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{self, consumer};
use chrono::{DateTime, Utc};
use evgrid_common::nats::Nats;
use evgrid_common::{heartbeats, streams};
use evgrid_model::messages::{SessionEvent, SessionEventKind, SessionOutcome, SessionReport};
use evgrid_model::{headers, subjects};
use hdrhistogram::Histogram;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::grid::{self, HeartbeatSample};
use super::plan::RunIds;
use super::stats::{self, Completion, Latency};

const ACCEPTED: u8 = 1;
const SETTLED: u8 = 2;
const DISPATCHED: u8 = 4;
const STARTED: u8 = 8;
const COMPLETED: u8 = 16;
const REJECTED: u8 = 32;

/// Where each request of the run stands, one byte of flags per request: senders set
/// "accepted", the followers the rest. A request is settled once completed or rejected; the run
/// waits until every accepted request is.
#[derive(Debug)]
pub struct Tracker {
    ids: RunIds,
    flags: Vec<AtomicU8>,
    settled_accepted: AtomicU64,
    completed: AtomicU64,
    changed: Notify,
}

impl Tracker {
    pub fn new(ids: RunIds, requests: u64) -> Self {
        Self {
            ids,
            flags: (0..requests).map(|_| AtomicU8::new(0)).collect(),
            settled_accepted: AtomicU64::new(0),
            completed: AtomicU64::new(0),
            changed: Notify::new(),
        }
    }

    /// Request `i` was accepted by the target.
    pub fn accepted(&self, i: u64) {
        let before = self.flags[i as usize].fetch_or(ACCEPTED, Ordering::AcqRel);
        // Events can overtake the HTTP answer or the PubAck: whichever side comes second
        // counts the request as settled, so it is counted exactly once.
        if before & SETTLED != 0 && before & ACCEPTED == 0 {
            self.settled_accepted.fetch_add(1, Ordering::AcqRel);
            self.changed.notify_one();
        }
    }

    /// Sets `bits` on the request with id `id` if it is one of this run's; returns the flags
    /// it had before.
    fn mark(&self, id: uuid::Uuid, bits: u8) -> Option<u8> {
        let flags = self.flags.get(usize::try_from(self.ids.index(id)?).ok()?)?;
        Some(flags.fetch_or(bits, Ordering::AcqRel))
    }

    /// Marks the request completed or rejected (`bit`); true the first time `bit` is set.
    fn settle(&self, id: uuid::Uuid, bit: u8) -> bool {
        let Some(before) = self.mark(id, bit | SETTLED) else {
            return false;
        };
        if before & SETTLED == 0 && before & ACCEPTED != 0 {
            self.settled_accepted.fetch_add(1, Ordering::AcqRel);
            self.changed.notify_one();
        }
        before & bit == 0
    }

    /// Requests of the run that completed (for the progress bar).
    pub fn completed(&self) -> u64 {
        self.completed.load(Ordering::Relaxed)
    }

    /// Waits until `accepted` requests are settled; false when `deadline` or `shutdown` came
    /// first.
    pub async fn wait_settled(
        &self,
        accepted: u64,
        deadline: tokio::time::Instant,
        shutdown: &CancellationToken,
    ) -> bool {
        loop {
            if self.settled_accepted.load(Ordering::Acquire) >= accepted {
                return true;
            }
            tokio::select! {
                _ = self.changed.notified() => {}
                _ = tokio::time::sleep_until(deadline) => return false,
                _ = shutdown.cancelled() => return false,
            }
        }
    }

    /// (completed, rejected, neither) among the accepted requests.
    fn outcome(&self) -> (u64, u64, u64) {
        let (mut completed, mut rejected, mut open) = (0, 0, 0);
        for f in &self.flags {
            let f = f.load(Ordering::Acquire);
            if f & ACCEPTED == 0 {
                continue;
            }
            if f & COMPLETED != 0 {
                completed += 1;
            } else if f & REJECTED != 0 {
                rejected += 1;
            } else {
                open += 1;
            }
        }
        (completed, rejected, open)
    }
}

/// What the followers collected, turned into figures at the end.
#[derive(Debug)]
struct Observations {
    dispatch: Histogram<u64>,
    charging_start: Histogram<u64>,
    per_substation: BTreeMap<String, u64>,
    /// Dispatch time and index into `substations`.
    dispatches: Vec<(DateTime<Utc>, usize)>,
    substations: Vec<String>,
    heartbeats: Vec<HeartbeatSample>,
    interrupted: u64,
    /// Completions whose car left at its departure before it was fully charged.
    left_short: u64,
    /// Energy the completed sessions delivered, kWh.
    energy_delivered_kwh: f64,
    first_rejection: Option<String>,
}

impl Observations {
    fn new() -> Self {
        Self {
            dispatch: stats::histogram(),
            charging_start: stats::histogram(),
            per_substation: BTreeMap::new(),
            dispatches: Vec::new(),
            substations: Vec::new(),
            heartbeats: Vec::new(),
            interrupted: 0,
            left_short: 0,
            energy_delivered_kwh: 0.0,
            first_rejection: None,
        }
    }

    fn dispatched(&mut self, e: &SessionEvent) {
        let index = match self.substations.iter().position(|s| *s == e.substation_id) {
            Some(i) => i,
            None => {
                self.substations.push(e.substation_id.clone());
                self.substations.len() - 1
            }
        };
        self.dispatches.push((e.dispatched_at, index));
        *self
            .per_substation
            .entry(e.substation_id.clone())
            .or_default() += 1;
        stats::record(&mut self.dispatch, since(e.accepted_at, e.dispatched_at));
    }
}

/// Non-negative wall-clock span (clocks of one machine; a tiny skew must not wrap around).
fn since(from: DateTime<Utc>, to: DateTime<Utc>) -> Duration {
    (to - from).to_std().unwrap_or_default()
}

/// The running followers of one run.
#[derive(Debug)]
pub struct Follower {
    tracker: Arc<Tracker>,
    observations: Arc<Mutex<Observations>>,
    tasks: TaskTracker,
    stop: CancellationToken,
}

impl Follower {
    /// Starts following at the current end of `EV_SESSIONS` and `EV_REJECTED`, and every
    /// heartbeat. Fails when the streams are missing (no pipeline on this server).
    pub async fn start(nats: &Nats, tracker: Arc<Tracker>) -> anyhow::Result<Self> {
        let js = &nats.js;
        let observations = Arc::new(Mutex::new(Observations::new()));
        let tasks = TaskTracker::new();
        let stop = CancellationToken::new();

        let sessions_from = next_sequence(js, streams::SESSIONS).await?;
        let rejected_from = next_sequence(js, streams::REJECTED).await?;

        let (t, o) = (tracker.clone(), observations.clone());
        tasks.spawn(follow_stream(
            nats.clone(),
            streams::SESSIONS,
            subjects::SESSIONS_ALL,
            sessions_from,
            stop.clone(),
            move |msg| on_session(&t, &o, msg),
        ));
        let (t, o) = (tracker.clone(), observations.clone());
        tasks.spawn(follow_stream(
            nats.clone(),
            streams::REJECTED,
            subjects::REJECTED,
            rejected_from,
            stop.clone(),
            move |msg| on_rejected(&t, &o, msg),
        ));
        let o = observations.clone();
        tasks.spawn(heartbeats::follow(
            nats.clone(),
            stop.clone(),
            move |seen| {
                o.lock()
                    .expect("poisoned")
                    .heartbeats
                    .push(HeartbeatSample {
                        substation: seen.heartbeat.substation_id,
                        stored_at: seen.stored_at,
                        capacity_kw: seen.heartbeat.capacity_kw,
                        load_kw: seen.heartbeat.load_kw,
                        interval: Duration::from_millis(seen.heartbeat.interval_ms),
                    });
            },
            |_| {},
        ));
        tasks.close();
        Ok(Self {
            tracker,
            observations,
            tasks,
            stop,
        })
    }

    /// Stops following and sums up, for a run that started at `run_start`.
    pub async fn finish(self, run_start: DateTime<Utc>) -> (Completion, Option<String>) {
        self.stop.cancel();
        self.tasks.wait().await;
        let o = self.observations.lock().expect("poisoned");
        let (completed, rejected, incomplete) = self.tracker.outcome();
        let dispatches: Vec<(DateTime<Utc>, &str)> = o
            .dispatches
            .iter()
            .map(|(t, i)| (*t, o.substations[*i].as_str()))
            .collect();
        let completion = Completion {
            completed,
            rejected,
            incomplete,
            interrupted_events: o.interrupted,
            left_short: o.left_short,
            energy_delivered_kwh: o.energy_delivered_kwh,
            dispatch_latency_ms: Latency::of(&o.dispatch),
            charging_start_latency_ms: Latency::of(&o.charging_start),
            per_substation: o.per_substation.clone(),
            peak_utilization: grid::peak_utilization(&o.heartbeats, run_start),
            herd_factor: grid::herd_factor(
                &dispatches,
                &grid::capacities(&o.heartbeats, run_start),
                grid::heartbeat_interval(&o.heartbeats),
                grid::HERD_MIN_DISPATCHES,
            ),
        };
        (completion, o.first_rejection.clone())
    }
}

async fn next_sequence(js: &jetstream::Context, stream: &str) -> anyhow::Result<u64> {
    let stream = js.get_stream(stream).await.with_context(|| {
        format!("--wait-complete needs stream {stream}: is the evgrid pipeline running on this NATS server, and may this NATS user read it?")
    })?;
    Ok(stream.cached_info().state.last_sequence + 1)
}

fn on_session(tracker: &Tracker, observations: &Mutex<Observations>, msg: &jetstream::Message) {
    let Ok(SessionReport { event, outcome }) = serde_json::from_slice(&msg.payload) else {
        tracing::warn!(subject = %msg.subject, "ignoring a malformed session event");
        return;
    };
    // Every event carries the dispatch; the first one seen of a request records it.
    let Some(before) = tracker.mark(event.request_id, DISPATCHED) else {
        return;
    };
    let mut o = observations.lock().expect("poisoned");
    if before & DISPATCHED == 0 {
        o.dispatched(&event);
    }
    match event.event {
        SessionEventKind::Accepted => {}
        SessionEventKind::Started => {
            if tracker
                .mark(event.request_id, STARTED)
                .is_some_and(|before| before & STARTED == 0)
            {
                stats::record(&mut o.charging_start, since(event.accepted_at, event.at));
            }
        }
        SessionEventKind::Completed => {
            if tracker.settle(event.request_id, COMPLETED) {
                tracker.completed.fetch_add(1, Ordering::Relaxed);
                o.energy_delivered_kwh += event.energy_delivered_kwh;
                if outcome == Some(SessionOutcome::Departed) {
                    o.left_short += 1;
                }
            }
        }
        SessionEventKind::Interrupted => o.interrupted += 1,
    }
}

fn on_rejected(tracker: &Tracker, observations: &Mutex<Observations>, msg: &jetstream::Message) {
    let header = |name: &str| {
        msg.headers
            .as_ref()
            .and_then(|h| h.get(name))
            .map(|v| v.as_str().to_owned())
    };
    let id = header(headers::REQUEST_ID)
        .and_then(|h| h.parse().ok())
        .or_else(|| {
            serde_json::from_slice::<serde_json::Value>(&msg.payload)
                .ok()?
                .get("request_id")?
                .as_str()?
                .parse()
                .ok()
        });
    if let Some(id) = id
        && tracker.settle(id, REJECTED)
    {
        let reason = header(headers::REJECT_REASON).unwrap_or_else(|| "unknown".into());
        let detail = header(headers::REJECT_DETAIL).unwrap_or_default();
        observations
            .lock()
            .expect("poisoned")
            .first_rejection
            .get_or_insert_with(|| format!("{reason}: {detail}"));
    }
}

/// Calls `on` for every message of `stream` matching `filter` from sequence `from` on, until
/// `stop`; after a failure the rebuilt consumer goes on after the last message seen.
async fn follow_stream(
    nats: Nats,
    stream: &'static str,
    filter: &'static str,
    from: u64,
    stop: CancellationToken,
    on: impl FnMut(&jetstream::Message) + Send,
) {
    let config = |next: u64| consumer::pull::OrderedConfig {
        filter_subject: filter.into(),
        deliver_policy: consumer::DeliverPolicy::ByStartSequence {
            start_sequence: next.max(from),
        },
        ..Default::default()
    };
    evgrid_common::nats::follow_ordered(&nats, stream, "event feed", config, &stop, on).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_settles_once_whichever_side_comes_first() {
        let ids = RunIds::new(42 << 64);
        let t = Tracker::new(ids, 3);
        t.accepted(0);
        assert!(t.settle(ids.id(0), COMPLETED));
        assert!(
            !t.settle(ids.id(0), COMPLETED),
            "a repeated event counts once"
        );
        // The event overtakes the answer.
        assert!(t.settle(ids.id(1), REJECTED));
        t.accepted(1);
        t.accepted(2);
        assert_eq!(t.settled_accepted.load(Ordering::Acquire), 2);
        assert_eq!(t.outcome(), (1, 1, 1));
        assert!(!t.settle(uuid::Uuid::new_v4(), COMPLETED), "not ours");
        assert!(!t.settle(ids.id(7), COMPLETED), "beyond the plan");
    }
}
