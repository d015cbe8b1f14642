//! The live substation: the last stage of ingest → dispatcher → **substation**. It takes the
//! assignments on `ev.dispatch.<id>` (durable consumer `substation-<id>`), charges them in the
//! pure [`Station`] model on a simulated clock, and reports through one ordered
//! [`Publisher`]: session events on `ev.sessions.<id>.<event>`, request states in
//! `EV_REQUEST_STATE`, heartbeats on `ev.telemetry.<id>`.
//!
//! A dispatch message stays un-acked while its session lives (progress acks keep it from being
//! redelivered): it is the session's durable record. It is acked only after the completion's
//! writes are acknowledged; a session completes when its energy is delivered or when the car
//! leaves at its departure (`completed`, outcome `departed`, with the energy it got). On shutdown
//! the live sessions record their energy, announce `interrupted` and hand their messages back
//! (nak) to the next substation process, which resumes them from the recorded energy.
//!
//! Grid-operator limits on `ev.limits.<id>` ([`crate::limits`]) change the capacity at run
//! time; heartbeats carry the capacity in force and the sessions' projection
//! ([`Station::projection`]) for the dispatcher's predictive routing.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::time::Duration;

use async_nats::jetstream::consumer::{self, PullConsumer};
use async_nats::jetstream::message::{Acker, PublishMessage};
use async_nats::jetstream::{self, AckKind, kv};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use evgrid_common::http::Readiness;
use evgrid_common::nats::{self, NatsError};
use evgrid_common::streams;
use evgrid_model::messages::{
    Dispatch, Heartbeat, Limit, RequestRecord, RequestState, SessionEvent, SessionEventKind,
    SessionOutcome, SessionReport, Telemetry,
};
use evgrid_model::{headers, subjects};

use crate::Config;
use crate::limits::{self, LimitFeed};
use crate::metrics::Metrics;
use crate::publisher::{Publisher, Write};
use crate::reopen::Reopening;
use evgrid_model::charging::{Arrival, Event, EventKind, Station};
use evgrid_model::limits::{InForce, resolve};

/// Progress acks go out this often, well within the consumer's ack wait.
const PROGRESS_EVERY: Duration = Duration::from_secs(streams::SUBSTATION_ACK_WAIT.as_secs() / 3);
/// On shutdown, how long to wait for the last writes before giving up on them (their messages
/// are then redelivered after the ack wait, and resumed from the previous record).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// A dispatch that cannot be handled now (state unreadable) comes back after this.
const RETRY_DELAY: Duration = Duration::from_secs(1);
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Dispatches taken ahead of the one being handled, each with its request's stored state being
/// read meanwhile: one state read awaited per dispatch, in turn, capped a substation at about
/// 800 dispatches a second however idle its CPU (docs/benchmarks.md).
const READ_AHEAD: usize = 64;
/// At start, how long to wait for the stored grid-operator limits before charging.
const LIMITS_REPLAY_TIMEOUT: Duration = Duration::from_secs(5);

/// The dispatches this process has handled, as the heartbeat echoes them (`dispatch_seq`): the
/// dispatcher stops counting an assignment as in flight once the echo reaches its sequence.
#[derive(Debug, Default)]
struct Taken {
    /// The highest sequence handled.
    highest: u64,
    /// Sequences handed back for later (their state could not be read), not handled since.
    held_back: BTreeSet<u64>,
}

impl Taken {
    fn took(&mut self, seq: u64) {
        self.held_back.remove(&seq);
        self.highest = self.highest.max(seq);
    }

    fn held_back(&mut self, seq: u64) {
        self.held_back.insert(seq);
    }

    /// The highest sequence below which every dispatch is handled: an assignment handed back
    /// is not in the load yet, so the echo stays below it until it is.
    fn echo(&self) -> u64 {
        match self.held_back.first() {
            Some(&first) if first <= self.highest => first - 1,
            _ => self.highest,
        }
    }
}

/// Maps the simulated clock of the charging model to wall time: simulated seconds since start
/// = wall seconds since start × time scale.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SimClock {
    start: Instant,
    start_wall: DateTime<Utc>,
    scale: f64,
}

impl SimClock {
    pub fn new(start: Instant, start_wall: DateTime<Utc>, scale: f64) -> Self {
        Self {
            start,
            start_wall,
            scale,
        }
    }

    /// Simulated seconds at `instant`.
    pub fn sim_at(&self, instant: Instant) -> f64 {
        instant.saturating_duration_since(self.start).as_secs_f64() * self.scale
    }

    /// The instant the simulated clock reads `sim` (far future when out of range).
    pub fn instant_at(&self, sim: f64) -> Instant {
        let real = Duration::try_from_secs_f64((sim / self.scale).max(0.0))
            .unwrap_or(Duration::from_secs(365 * 24 * 3600));
        self.start + real.min(Duration::from_secs(365 * 24 * 3600))
    }

    /// The wall-clock time at simulated time `sim`.
    pub fn wall_at(&self, sim: f64) -> DateTime<Utc> {
        self.start_wall + chrono::Duration::microseconds((sim / self.scale * 1e6) as i64)
    }

    fn now(&self) -> f64 {
        self.sim_at(Instant::now())
    }
}

/// Connects, makes sure the streams and the consumer exist, then charges until `shutdown`.
pub(crate) async fn run(
    config: Config,
    metrics: Metrics,
    readiness: Readiness,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let name = format!("evgrid-substation-{}", config.id);
    let nats = match nats::connect(&config.nats.nats_url, &name, &shutdown).await {
        Ok(nats) => nats,
        Err(NatsError::Shutdown) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    readiness.set_nats(nats.clone());
    let retention = streams::Retention::default();
    let Some(kv) = until_ok(&shutdown, "create or update the streams", || {
        streams::ensure(&nats.js, &retention)
    })
    .await
    else {
        return Ok(());
    };
    readiness.set_streams_ready(true);

    let (publisher, writer) = Publisher::start(nats.js.clone());
    let mut feed = ReadAhead::new(Feed::new(nats.js.clone(), config.id.clone()), kv.clone());
    let mut limit_feed = LimitFeed::new(nats.js.clone(), &config.id);
    let mut substation = Substation::new(&config, kv, publisher, metrics);
    // A limit in force applies before the first car charges: replay the stored messages.
    let last = tokio::select! {
        _ = shutdown.cancelled() => return Ok(()),
        last = limit_feed.last_seq() => last,
    };
    match last {
        Ok(Some(last)) => {
            let mut in_force = None;
            // Bounded: a stored limit an operator purges before it is delivered would otherwise
            // hold the substation back until the next limit.
            let deadline = tokio::time::sleep(LIMITS_REPLAY_TIMEOUT);
            tokio::pin!(deadline);
            while substation.limit_seq < last {
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = &mut deadline => {
                        tracing::warn!(last, replayed = substation.limit_seq, "stored grid-operator limits not all delivered within {LIMITS_REPLAY_TIMEOUT:?}; charging now, later ones apply as they arrive");
                        break;
                    }
                    received = limit_feed.next() => {
                        in_force = substation.take_limit(received).or(in_force);
                    }
                }
            }
            if let Some(in_force) = in_force {
                substation.set_limit(in_force);
            }
        }
        Ok(None) => {}
        // The limit consumer delivers them shortly.
        Err(e) => tracing::warn!(error = %e, "cannot read the stored grid-operator limits yet"),
    }
    tracing::info!(
        capacity_kw = substation.station.capacity_kw(),
        time_scale = config.time_scale,
        allocation = config.allocation.as_str(),
        "substation charging"
    );
    substation
        .serve(
            &mut feed,
            &mut limit_feed,
            config.heartbeat_interval,
            &shutdown,
        )
        .await;
    substation.stop(&mut feed).await;
    drop(substation);

    // Every handle is gone: the writer finishes what it holds (heartbeats) and returns.
    let abort = writer.abort_handle();
    if tokio::time::timeout(DRAIN_TIMEOUT, writer).await.is_err() {
        abort.abort();
        tracing::warn!("gave up on writes NATS did not acknowledge within {DRAIN_TIMEOUT:?}");
    }
    // Acks and naks are plain publishes: make sure they left before the connection closes.
    if let Err(e) = tokio::time::timeout(DRAIN_TIMEOUT, nats.client.flush()).await {
        tracing::warn!(error = %e, "cannot flush the NATS connection");
    }
    tracing::info!("substation stopped");
    Ok(())
}

/// Retries `f` with backoff until it succeeds or `shutdown` fires (then `None`).
async fn until_ok<T, E: std::fmt::Display, Fut: Future<Output = Result<T, E>>>(
    shutdown: &CancellationToken,
    what: &str,
    mut f: impl FnMut() -> Fut,
) -> Option<T> {
    let mut backoff = BACKOFF_FIRST;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            result = f() => match result {
                Ok(value) => return Some(value),
                Err(e) => tracing::warn!(error = %e, retry_in = ?backoff, "cannot {what} yet"),
            },
        }
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// The dispatch messages of this substation: the durable consumer's message stream, rebuilt
/// with backoff whenever it ends or fails (server restart), for ever.
struct Feed {
    js: jetstream::Context,
    id: String,
    messages: Reopening<consumer::pull::Stream>,
}

impl Feed {
    fn new(js: jetstream::Context, id: String) -> Self {
        Self {
            js,
            id,
            messages: Reopening::new("dispatch consumer"),
        }
    }

    /// The next dispatch message. Cancel-safe.
    async fn next(&mut self) -> jetstream::Message {
        let Self { js, id, messages } = self;
        messages.next(|| open(js, id)).await
    }

    /// Stops pulling; returns the messages that already reached this process but were not
    /// taken yet.
    fn close(&mut self) -> Vec<jetstream::Message> {
        let mut buffered = Vec::new();
        if let Some(mut messages) = self.messages.take() {
            while let Some(Some(Ok(msg))) = messages.next().now_or_never() {
                buffered.push(msg);
            }
        }
        buffered
    }
}

/// The stored state of a dispatch's request (`EV_REQUEST_STATE`), read ahead of handling it.
type StateRead = Result<Option<Bytes>, async_nats::Error>;

/// Dispatch messages with their request's stored state read ahead: up to [`READ_AHEAD`]
/// messages are taken from the feed while earlier ones are handled, each with its state read
/// running meanwhile, and handed out in delivery order. One awaited state read per dispatch, in
/// turn, capped a substation near 800 dispatches a second (docs/benchmarks.md).
struct ReadAhead {
    feed: Feed,
    kv: kv::Store,
    /// Taken from the feed, not handed out yet: each message with its state read.
    reading: VecDeque<(jetstream::Message, JoinHandle<StateRead>)>,
}

impl ReadAhead {
    fn new(feed: Feed, kv: kv::Store) -> Self {
        Self {
            feed,
            kv,
            reading: VecDeque::new(),
        }
    }

    /// The next dispatch message, in delivery order, with its request's state. Cancel-safe:
    /// messages taken while waiting stay queued with their reads.
    async fn next(&mut self) -> (jetstream::Message, StateRead) {
        let Self { feed, kv, reading } = self;
        loop {
            tokio::select! {
                biased;
                // Awaiting the handle by reference: dropping this future leaves it queued.
                state = async { (&mut reading.front_mut().expect("non-empty").1).await },
                    if !reading.is_empty() =>
                {
                    let (msg, _) = reading.pop_front().expect("non-empty");
                    let state = state.map_err(async_nats::Error::from).and_then(|read| read);
                    return (msg, state);
                }
                msg = feed.next(), if reading.len() < READ_AHEAD => {
                    let read = tokio::spawn(read_state(kv.clone(), request_key(&msg)));
                    reading.push_back((msg, read));
                }
            }
        }
    }

    /// Stops pulling; returns the messages taken but not handed out yet (their reads are
    /// dropped), then those that reached the feed, in delivery order.
    fn close(&mut self) -> Vec<jetstream::Message> {
        let mut messages: Vec<jetstream::Message> = self
            .reading
            .drain(..)
            .map(|(msg, read)| {
                read.abort();
                msg
            })
            .collect();
        messages.extend(self.feed.close());
        messages
    }
}

/// The state key of a dispatch's request: its id, from the body (`None` when the body is not a
/// dispatch: handling it terminates the message without a state).
fn request_key(msg: &jetstream::Message) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Id {
        request_id: Uuid,
    }
    serde_json::from_slice::<Id>(&msg.payload)
        .ok()
        .map(|id| id.request_id.to_string())
}

async fn read_state(kv: kv::Store, key: Option<String>) -> StateRead {
    match key {
        Some(key) => Ok(kv.get(key).await?),
        None => Ok(None),
    }
}

/// The substation's durable consumer, created or brought up to date, and its message stream.
async fn open(
    js: &jetstream::Context,
    substation_id: &str,
) -> Result<consumer::pull::Stream, async_nats::Error> {
    let stream = js.get_stream(streams::DISPATCH).await?;
    let wanted = streams::substation_consumer(substation_id);
    let name = streams::substation_consumer_name(substation_id);
    let mut consumer: PullConsumer = stream.get_or_create_consumer(&name, wanted.clone()).await?;
    if differs(&consumer.cached_info().config, &wanted) {
        tracing::info!(consumer = %name, "updating the consumer to the current definition");
        consumer = stream.create_consumer(wanted).await?;
    }
    Ok(consumer.messages().await?)
}

/// True when the server's consumer differs from ours in a setting this service relies on.
fn differs(have: &consumer::Config, want: &consumer::pull::Config) -> bool {
    have.filter_subject != want.filter_subject
        || have.ack_policy != want.ack_policy
        || have.ack_wait != want.ack_wait
        || have.max_deliver != want.max_deliver
        || have.max_ack_pending != want.max_ack_pending
        || have.description != want.description
}

/// A session this process is charging (or finishing): its assignment and its message.
struct Live {
    dispatch: Dispatch,
    acker: Acker,
    /// `EV_DISPATCH` sequence and delivery count of the message held.
    stream_seq: u64,
    delivery: i64,
    /// Energy delivered before this process took the session (a resumed session), kWh.
    prior_kwh: f64,
    /// Wall time of the session's first power ever (kept across resumptions).
    charging_started_at: Option<DateTime<Utc>>,
    /// When ingest accepted the request (header, else the dispatch body).
    accepted_at: DateTime<Utc>,
    /// Set once the session's final writes are queued: what to do with its message when they
    /// are durable.
    ending: Option<Ending>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// Completion written: ack.
    Completed,
    /// Interruption written (shutdown): hand the message back.
    Interrupted,
}

impl Live {
    /// The state of a session waiting for power: `dispatched`, or still `charging` once it has
    /// drawn power (paused, or resumed by a new process), since states never go backwards.
    fn waiting_state(&self) -> RequestState {
        if self.charging_started_at.is_some() || self.prior_kwh > 0.0 {
            RequestState::Charging
        } else {
            RequestState::Dispatched
        }
    }
}

type Receipt = BoxFuture<'static, (Uuid, bool)>;

/// The live state of one substation.
struct Substation {
    id: String,
    clock: SimClock,
    station: Station,
    /// Sessions in the model, and sessions whose final writes are in flight.
    sessions: HashMap<Uuid, Live>,
    receipts: FuturesUnordered<Receipt>,
    publisher: Publisher,
    kv: kv::Store,
    metrics: Metrics,
    heartbeat_seq: u64,
    heartbeat_interval_ms: u64,
    /// The `EV_DISPATCH` sequences handled, for the heartbeat's echo.
    taken: Taken,
    /// `--capacity-kw`: the capacity without a grid-operator limit.
    configured_capacity_kw: f64,
    /// The grid-operator limit in force (the configured capacity when there is none).
    limit: InForce,
    /// When the limit in force ends, on the tokio clock.
    limit_end: Option<Instant>,
    /// `EV_LIMITS` sequence of the last limit message handled.
    limit_seq: u64,
}

impl Substation {
    fn new(config: &Config, kv: kv::Store, publisher: Publisher, mut metrics: Metrics) -> Self {
        let station = Station::new(config.capacity_kw, config.allocation, 0.0);
        metrics.observe(&station.snapshot());
        Self {
            id: config.id.clone(),
            clock: SimClock::new(Instant::now(), Utc::now(), config.time_scale),
            station,
            sessions: HashMap::new(),
            receipts: FuturesUnordered::new(),
            publisher,
            kv,
            metrics,
            heartbeat_seq: 0,
            heartbeat_interval_ms: config.heartbeat_interval.as_millis() as u64,
            taken: Taken::default(),
            configured_capacity_kw: config.capacity_kw,
            limit: InForce::configured(config.capacity_kw),
            limit_end: None,
            limit_seq: 0,
        }
    }

    /// Charges until `shutdown`: takes dispatches, completes sessions on time (and lets cars
    /// leave at their departure), applies grid-operator limits, heartbeats.
    async fn serve(
        &mut self,
        feed: &mut ReadAhead,
        limit_feed: &mut LimitFeed,
        heartbeat: Duration,
        shutdown: &CancellationToken,
    ) {
        let mut heartbeat = tokio::time::interval(heartbeat);
        heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut progress = tokio::time::interval(PROGRESS_EVERY);
        progress.set_missed_tick_behavior(MissedTickBehavior::Delay);
        progress.reset();
        loop {
            let wake = self
                .station
                .next_event_time()
                .map(|t| self.clock.instant_at(t));
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return,
                Some((id, durable)) = self.receipts.next(), if !self.receipts.is_empty() => {
                    self.on_receipt(id, durable).await;
                }
                _ = tokio::time::sleep_until(wake.unwrap_or_else(Instant::now)), if wake.is_some() => {
                    // Never stop short of the completion that woke us (float rounding).
                    let due = self.station.next_event_time().unwrap_or(0.0);
                    self.advance(self.clock.now().max(due));
                }
                _ = tokio::time::sleep_until(self.limit_end.unwrap_or_else(Instant::now)), if self.limit_end.is_some() => {
                    tracing::info!(capacity_kw = self.configured_capacity_kw, "grid-operator limit ended; back to the configured capacity");
                    self.set_limit(InForce::configured(self.configured_capacity_kw));
                }
                _ = heartbeat.tick() => self.heartbeat(),
                _ = progress.tick() => self.progress().await,
                limit = limit_feed.next() => {
                    if let Some(in_force) = self.take_limit(limit) {
                        self.set_limit(in_force);
                    }
                }
                (msg, state) = feed.next() => self.on_message(msg, state).await,
            }
        }
    }

    /// A message on `ev.limits.<id>`: what it puts in force, or `None` when it is invalid
    /// (logged and counted; the limit in force stays) or already handled (a rebuilt consumer
    /// delivers the stored messages again).
    fn take_limit(&mut self, received: limits::Received) -> Option<InForce> {
        if received.seq != 0 && received.seq <= self.limit_seq {
            return None;
        }
        self.limit_seq = self.limit_seq.max(received.seq);
        match Limit::parse(&received.payload) {
            Ok(limit) => {
                let in_force = resolve(&limit, self.configured_capacity_kw, Utc::now());
                tracing::info!(
                    capacity_kw = in_force.capacity_kw,
                    until = ?in_force.until,
                    seq = received.seq,
                    "grid-operator limit"
                );
                self.metrics.limit_applied.inc();
                Some(in_force)
            }
            Err(e) => {
                tracing::warn!(error = %e, seq = received.seq, "ignoring an invalid grid-operator limit");
                self.metrics.limit_invalid.inc();
                None
            }
        }
    }

    /// Puts `in_force` in force: re-allocates at once (the load never exceeds the new capacity)
    /// and heartbeats, so the dispatcher sees the new capacity without waiting an interval.
    fn set_limit(&mut self, in_force: InForce) {
        self.advance(self.clock.now());
        let events = self.station.set_capacity(in_force.capacity_kw);
        self.apply(events);
        self.limit_end = in_force.until.map(|until| {
            let wait = (until - Utc::now()).to_std().unwrap_or_default();
            Instant::now() + wait
        });
        self.limit = in_force;
        self.heartbeat();
    }

    /// Brings the model to `sim` and reports what happened.
    fn advance(&mut self, sim: f64) {
        let events = self.station.advance_to(sim);
        self.apply(events);
    }

    /// Records that the dispatch at `seq` is handled: in the model, or skipped for good. The
    /// heartbeat echoes it, so the dispatcher stops counting it as in flight.
    fn took_dispatch(&mut self, seq: u64) {
        self.taken.took(seq);
    }

    /// `state`: the request's record in `EV_REQUEST_STATE`, read when the message was taken.
    async fn on_message(&mut self, msg: jetstream::Message, state: StateRead) {
        let (stream_seq, delivery) = match msg.info() {
            Ok(info) => (info.stream_sequence, info.delivered),
            Err(e) => {
                tracing::warn!(subject = %msg.subject, error = %e, "ignoring a message without JetStream metadata");
                return;
            }
        };
        let header_request_id = header(&msg, headers::REQUEST_ID).map(str::to_owned);
        let header_accepted_at = header(&msg, headers::ACCEPTED_AT)
            .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
            .map(|t| t.with_timezone(&Utc));
        let (msg, acker) = msg.split();
        let dispatch = match parse_dispatch(&msg.payload) {
            Ok(d) => d,
            Err(problem) => {
                tracing::error!(
                    request_id = header_request_id.as_deref().unwrap_or(""),
                    stream_seq,
                    %problem,
                    "invalid dispatch message; terminating it"
                );
                ack(&acker, AckKind::Term, "term").await;
                self.took_dispatch(stream_seq);
                return;
            }
        };
        let request_id = dispatch.request_id;

        if let Some(live) = self.sessions.get_mut(&request_id) {
            if live.stream_seq == stream_seq {
                // The same message again (an ack wait passed): keep holding it, through the
                // newest delivery.
                tracing::info!(%request_id, delivery, "dispatch redelivered; session continues");
                live.acker = acker;
                live.delivery = delivery;
            } else {
                tracing::info!(%request_id, stream_seq, "duplicate dispatch of a session here; skipping");
                ack(&acker, AckKind::Ack, "ack").await;
                self.took_dispatch(stream_seq);
            }
            return;
        }

        // A redelivery's state read ahead may predate the end of its own earlier delivery
        // (acked meanwhile): read it again rather than resume a finished session. Rare path.
        let state = if delivery > 1 {
            read_state(self.kv.clone(), Some(request_id.to_string())).await
        } else {
            state
        };
        let record = match state {
            Ok(value) => value.and_then(|v| serde_json::from_slice::<RequestRecord>(&v).ok()),
            Err(e) => {
                tracing::warn!(%request_id, error = %e, "cannot read the request state; retrying the dispatch later");
                self.taken.held_back(stream_seq);
                ack(&acker, AckKind::Nak(Some(RETRY_DELAY)), "nak").await;
                return;
            }
        };
        if let Some(record) = record.as_ref().filter(|r| r.state.is_final()) {
            tracing::info!(%request_id, state = ?record.state, "request already finished; skipping the dispatch");
            ack(&acker, AckKind::Ack, "ack").await;
            self.took_dispatch(stream_seq);
            return;
        }
        if let Some(other) = record
            .as_ref()
            .and_then(|r| r.substation_id.as_deref())
            .filter(|other| *other != self.id)
        {
            // Dispatched twice (an earlier delivery's ack was lost past the dedupe window): the
            // substation that took it first keeps it; one car charges in one place.
            tracing::warn!(%request_id, substation = other, "request already taken by another substation; skipping the dispatch");
            ack(&acker, AckKind::Ack, "ack").await;
            self.took_dispatch(stream_seq);
            return;
        }
        let prior_kwh = record.as_ref().map_or(0.0, |r| {
            r.energy_delivered_kwh.clamp(0.0, dispatch.energy_kwh)
        });

        self.advance(self.clock.now());
        let now = self.station.now();
        // A session taken here before (resumed after a restart) has been at the substation since
        // its dispatch: that time counts against its stay, so a restart never extends it.
        let resumed = record.as_ref().is_some_and(|r| r.substation_id.is_some());
        let stayed_s = if resumed {
            let wall = (Utc::now() - dispatch.dispatched_at).num_milliseconds();
            wall.max(0) as f64 / 1000.0 * self.clock.scale
        } else {
            0.0
        };
        let departure = dispatch.departure.map(|d| {
            // The departure keeps its distance from acceptance, on the simulated clock.
            now + (d - dispatch.accepted_at).num_milliseconds() as f64 / 1000.0 - stayed_s
        });
        let car = Arrival {
            id: request_id,
            max_power_kw: dispatch.max_power_kw,
            energy_kwh: dispatch.energy_kwh - prior_kwh,
            departure,
        };
        let live = Live {
            accepted_at: header_accepted_at.unwrap_or(dispatch.accepted_at),
            charging_started_at: record.as_ref().and_then(|r| r.charging_started_at),
            dispatch,
            acker,
            stream_seq,
            delivery,
            prior_kwh,
            ending: None,
        };
        if prior_kwh > 0.0 {
            tracing::info!(%request_id, prior_kwh, "resuming session");
        } else {
            tracing::info!(%request_id, "session accepted");
        }
        self.send_event(
            &live,
            SessionEventKind::Accepted,
            Utc::now(),
            prior_kwh,
            None,
        );
        self.sessions.insert(request_id, live);
        self.took_dispatch(stream_seq);

        let events = self.station.arrive(now, car);
        if self
            .station
            .session(request_id)
            .is_some_and(|s| !s.is_drawing())
        {
            let live = &self.sessions[&request_id];
            let record = self.record(live, live.waiting_state(), prior_kwh, None);
            self.send_state(record);
        }
        self.apply(events);
    }

    /// Reports the model's events: started and completed sessions.
    fn apply(&mut self, events: Vec<Event>) {
        for event in events {
            let at = self.clock.wall_at(event.at);
            match event.kind {
                EventKind::Started => self.on_started(event.id, at),
                EventKind::Completed => {
                    self.on_ended(event, at, SessionOutcome::Delivered);
                }
                EventKind::Departed => self.on_ended(event, at, SessionOutcome::Departed),
            }
        }
        self.metrics.observe(&self.station.snapshot());
    }

    fn on_started(&mut self, id: Uuid, at: DateTime<Utc>) {
        let Some(live) = self.sessions.get_mut(&id) else {
            return;
        };
        if live.charging_started_at.is_none() {
            live.charging_started_at = Some(at);
            let waited = (at - live.accepted_at).num_microseconds().unwrap_or(0) as f64 / 1e6;
            self.metrics
                .accept_to_charging_seconds
                .observe(waited.max(0.0));
        }
        self.metrics.sessions_started.inc();
        tracing::info!(request_id = %id, "charging");
        let live = &self.sessions[&id];
        self.send_event(live, SessionEventKind::Started, at, live.prior_kwh, None);
        let record = self.record(live, RequestState::Charging, live.prior_kwh, None);
        self.send_state(record);
    }

    /// The session ended: its energy is delivered, or the car left at its departure with what
    /// it got. Either way the request is `completed`, with the energy and the outcome.
    fn on_ended(&mut self, event: Event, at: DateTime<Utc>, outcome: SessionOutcome) {
        let id = event.id;
        let Some(live) = self.sessions.get_mut(&id) else {
            return;
        };
        live.ending = Some(Ending::Completed);
        let energy = match outcome {
            SessionOutcome::Delivered => {
                self.metrics.sessions_completed.inc();
                live.dispatch.energy_kwh
            }
            SessionOutcome::Departed => {
                self.metrics.sessions_departed.inc();
                (live.prior_kwh + event.delivered_kwh).min(live.dispatch.energy_kwh)
            }
        };
        let live = &self.sessions[&id];
        tracing::info!(
            request_id = %id,
            energy_kwh = live.dispatch.energy_kwh,
            energy_delivered_kwh = energy,
            outcome = outcome.as_str(),
            "session completed"
        );
        self.send_event(live, SessionEventKind::Completed, at, energy, Some(outcome));
        let record = RequestRecord {
            reason: Some(outcome.as_str().to_owned()),
            ..self.record(live, RequestState::Completed, energy, Some(at))
        };
        let (write, receipt) = self.state_write(record).with_receipt();
        self.publisher.send(write);
        // The message is acked once this last write (and all before it) is durable.
        self.receipts
            .push(Box::pin(receipt.map(move |r| (id, r.is_ok()))));
    }

    /// The final writes of a session are durable (or abandoned): ack or hand back its message.
    async fn on_receipt(&mut self, id: Uuid, durable: bool) {
        let Some(live) = self.sessions.remove(&id) else {
            return;
        };
        match (live.ending, durable) {
            (Some(Ending::Completed), true) => ack(&live.acker, AckKind::Ack, "ack").await,
            // Redelivered at once to whichever substation process pulls next: it resumes from
            // the energy just recorded.
            (Some(Ending::Interrupted), true) => ack(&live.acker, AckKind::Nak(None), "nak").await,
            // Not recorded: leave the message to its ack wait; a redelivery redoes the ending.
            _ => {
                tracing::warn!(request_id = %id, "final writes of the session were not acknowledged")
            }
        }
    }

    /// Keeps every held message from being redelivered, and records the energy of sessions that
    /// draw power, so a crash loses at most one progress interval of charging.
    async fn progress(&mut self) {
        self.advance(self.clock.now());
        for live in self.sessions.values() {
            ack(&live.acker, AckKind::Progress, "progress").await;
        }
        let mut checkpoints = Vec::new();
        for s in self.station.sessions().iter().filter(|s| s.is_drawing()) {
            if let Some(live) = self.sessions.get(&s.id) {
                let delivered = live.prior_kwh + s.delivered_kwh;
                checkpoints.push(self.record(live, RequestState::Charging, delivered, None));
            }
        }
        for record in checkpoints {
            self.send_state(record);
        }
    }

    /// Publishes the state now, with the projection for predictive routing and the limit in
    /// force.
    fn heartbeat(&mut self) {
        self.advance(self.clock.now());
        let s = self.station.snapshot();
        self.heartbeat_seq += 1;
        let heartbeat = Heartbeat {
            substation_id: self.id.clone(),
            seq: self.heartbeat_seq,
            sent_at: Utc::now(),
            capacity_kw: s.capacity_kw,
            load_kw: s.load_kw,
            active_sessions: s.active,
            queued_sessions: s.queued,
            demand_kw: s.demand_kw,
            dispatch_seq: self.taken.echo(),
            interval_ms: self.heartbeat_interval_ms,
        };
        let limited = self.limit.capacity_kw != self.configured_capacity_kw;
        let telemetry = Telemetry {
            heartbeat,
            projection: Some(self.station.projection()),
            configured_capacity_kw: limited.then_some(self.configured_capacity_kw),
            limit_until: self.limit.until,
        };
        self.publisher.send(Write::new(
            subjects::telemetry(&self.id),
            PublishMessage::build().payload(json(&telemetry)),
        ));
    }

    /// Shutdown: stop pulling, record and announce every live session as interrupted, hand
    /// their messages back once that is durable, and finish the completions in flight.
    async fn stop(&mut self, feed: &mut ReadAhead) {
        for msg in feed.close() {
            let held = msg.info().ok().is_some_and(|info| {
                self.sessions
                    .values()
                    .any(|l| l.stream_seq == info.stream_sequence)
            });
            // Never hand back a live session's message before its interruption is recorded.
            if !held && let Err(e) = msg.ack_with(AckKind::Nak(None)).await {
                tracing::warn!(error = %e, "cannot hand back an unread dispatch");
            }
        }
        self.advance(self.clock.now());
        let at = Utc::now();
        let mut interrupted = Vec::new();
        for s in self.station.sessions() {
            let Some(live) = self.sessions.get(&s.id) else {
                continue;
            };
            let delivered = live.prior_kwh + s.delivered_kwh;
            let state = if s.is_drawing() {
                RequestState::Charging
            } else {
                live.waiting_state()
            };
            interrupted.push((s.id, delivered, state));
        }
        for (id, delivered, state) in interrupted {
            let live = self.sessions.get_mut(&id).expect("live session");
            live.ending = Some(Ending::Interrupted);
            let live = &self.sessions[&id];
            tracing::info!(request_id = %id, energy_delivered_kwh = delivered, "session interrupted by shutdown");
            self.metrics.sessions_interrupted.inc();
            self.send_event(live, SessionEventKind::Interrupted, at, delivered, None);
            let (write, receipt) = self
                .state_write(self.record(live, state, delivered, None))
                .with_receipt();
            self.publisher.send(write);
            self.receipts
                .push(Box::pin(receipt.map(move |r| (id, r.is_ok()))));
        }
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        while !self.receipts.is_empty() {
            match tokio::time::timeout_at(deadline, self.receipts.next()).await {
                Ok(Some((id, durable))) => self.on_receipt(id, durable).await,
                Ok(None) => break,
                Err(_) => {
                    tracing::warn!(
                        sessions = self.receipts.len(),
                        "final writes not acknowledged in time; those messages are redelivered after the ack wait"
                    );
                    break;
                }
            }
        }
    }

    fn record(
        &self,
        live: &Live,
        state: RequestState,
        delivered_kwh: f64,
        completed_at: Option<DateTime<Utc>>,
    ) -> RequestRecord {
        let d = &live.dispatch;
        RequestRecord {
            request_id: d.request_id,
            state,
            vehicle_id: d.vehicle_id.clone(),
            energy_kwh: d.energy_kwh,
            max_power_kw: d.max_power_kw,
            departure: d.departure,
            substation_id: Some(self.id.clone()),
            energy_delivered_kwh: delivered_kwh,
            reason: None,
            accepted_at: d.accepted_at,
            dispatched_at: Some(d.dispatched_at),
            charging_started_at: live.charging_started_at,
            completed_at,
            rejected_at: None,
            updated_at: Utc::now(),
        }
    }

    fn state_write(&self, record: RequestRecord) -> Write {
        let key = record.request_id.to_string();
        // What `kv::Store::put` publishes to (the connection uses the default `$JS.API` prefix),
        // but through the ordered writer instead of an awaited put.
        let prefix = self.kv.put_prefix.as_ref().unwrap_or(&self.kv.prefix);
        Write::new(
            format!("{prefix}{key}"),
            PublishMessage::build().payload(json(&record)),
        )
    }

    fn send_state(&self, record: RequestRecord) {
        self.publisher.send(self.state_write(record));
    }

    fn send_event(
        &self,
        live: &Live,
        kind: SessionEventKind,
        at: DateTime<Utc>,
        delivered_kwh: f64,
        outcome: Option<SessionOutcome>,
    ) {
        let d = &live.dispatch;
        let event = SessionEvent {
            event: kind,
            request_id: d.request_id,
            substation_id: self.id.clone(),
            vehicle_id: d.vehicle_id.clone(),
            at,
            energy_kwh: d.energy_kwh,
            energy_delivered_kwh: delivered_kwh,
            accepted_at: d.accepted_at,
            dispatched_at: d.dispatched_at,
        };
        // One id per event of one delivery: a retried publish is stored once, while a resumed
        // session (a new delivery) announces itself again.
        let msg_id = format!(
            "{}.{}.{}.{}",
            d.request_id,
            kind.as_str(),
            live.stream_seq,
            live.delivery
        );
        let message = PublishMessage::build()
            .payload(json(&SessionReport { event, outcome }))
            .message_id(msg_id)
            .header(headers::REQUEST_ID, d.request_id.to_string())
            .header(headers::ACCEPTED_AT, live.accepted_at.to_rfc3339());
        self.publisher.send(Write::new(
            subjects::sessions(&self.id, kind.as_str()),
            message,
        ));
    }
}

fn header<'a>(msg: &'a jetstream::Message, name: &str) -> Option<&'a str> {
    msg.headers.as_ref()?.get(name).map(|v| v.as_str())
}

/// Why a dispatch message can never be charged: it is terminated, never redelivered.
#[derive(Debug, thiserror::Error)]
enum InvalidDispatch {
    #[error("not a dispatch: {0}")]
    NotADispatch(#[from] serde_json::Error),
    #[error("{field} must be a number greater than 0, got {value}")]
    NotPositive { field: &'static str, value: f64 },
}

/// A dispatch body the model can charge.
fn parse_dispatch(payload: &[u8]) -> Result<Dispatch, InvalidDispatch> {
    let d: Dispatch = serde_json::from_slice(payload)?;
    for (field, value) in [
        ("energy_kwh", d.energy_kwh),
        ("max_power_kw", d.max_power_kw),
    ] {
        if !(value.is_finite() && value > 0.0) {
            return Err(InvalidDispatch::NotPositive { field, value });
        }
    }
    Ok(d)
}

async fn ack(acker: &Acker, kind: AckKind, what: &'static str) {
    if let Err(e) = acker.ack_with(kind).await {
        // The server redelivers what it did not hear about; the handling is idempotent.
        tracing::warn!(error = %e, "cannot send {what} for a dispatch message");
    }
}

fn json<T: serde::Serialize>(value: &T) -> Bytes {
    Bytes::from(serde_json::to_vec(value).expect("message types serialize"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_simulated_clock_runs_time_scale_times_faster() {
        let start = Instant::now();
        let wall = DateTime::from_timestamp(1_700_000_000, 0).unwrap();
        let clock = SimClock::new(start, wall, 3600.0);
        assert_eq!(clock.sim_at(start + Duration::from_millis(500)), 1800.0);
        assert_eq!(clock.instant_at(7200.0), start + Duration::from_secs(2));
        assert_eq!(clock.wall_at(3600.0), wall + chrono::Duration::seconds(1));
        assert_eq!(clock.sim_at(start - Duration::from_secs(1)), 0.0);
        assert!(clock.instant_at(f64::INFINITY) > start + Duration::from_secs(3600));
    }

    #[test]
    fn the_echo_stays_below_a_dispatch_handed_back_until_it_is_taken() {
        let mut taken = Taken::default();
        assert_eq!(taken.echo(), 0);
        taken.took(3);
        taken.held_back(5);
        assert_eq!(taken.echo(), 3);
        // Later dispatches are taken, but the one handed back is not in the load yet.
        taken.took(6);
        taken.took(7);
        assert_eq!(taken.echo(), 4);
        taken.took(5);
        assert_eq!(taken.echo(), 7);
        // Handed back again and again, then taken: no trace left.
        taken.held_back(9);
        taken.held_back(9);
        assert_eq!(taken.echo(), 7);
        taken.took(9);
        assert_eq!(taken.echo(), 9);
    }

    #[test]
    fn dispatches_must_have_energy_and_power() {
        let body = |energy: f64, power: f64| {
            serde_json::json!({
                "request_id": Uuid::nil(), "substation_id": "s1", "vehicle_id": "ev",
                "energy_kwh": energy, "max_power_kw": power,
                "accepted_at": "2025-01-01T00:00:00Z", "dispatched_at": "2025-01-01T00:00:01Z",
                "request_seq": 1
            })
            .to_string()
        };
        assert!(parse_dispatch(body(10.0, 11.0).as_bytes()).is_ok());
        assert!(parse_dispatch(body(0.0, 11.0).as_bytes()).is_err());
        assert!(parse_dispatch(body(10.0, -1.0).as_bytes()).is_err());
        assert!(parse_dispatch(b"not json").is_err());
    }
}
