//! The charging-station side of OCPP 2.0.1: simulated stations that connect to a CSMS (an
//! evgrid substation, [`crate::server`]) as WebSocket clients, so a substation can be driven
//! by a thousand stations from one process (`evgrid stations`) and tested end to end.
//!
//! Each station is one tokio task with one EVSE (id 1, connector 1). It boots, reports its
//! connector, heartbeats, and lets cars charge: walk-ins on a seeded random schedule, and the
//! cars of reservations the CSMS makes (ReserveNow). A car authorizes, starts a transaction,
//! states its needs (NotifyEVChargingNeeds) and draws the last limit the CSMS set for the
//! transaction, or else the station's default (SetChargingProfile: TxProfile, TxDefaultProfile),
//! reporting its meter every `meter_interval`, until it has
//! its energy, leaves, or the CSMS stops it. A dropped connection is reopened with the
//! transaction still going. The arithmetic (limits, energy) is in pure functions.
//!
//! Times are real (tokio) times; `time_scale` stretches them into simulated time for energy
//! and stays, so an 8-hour stay can pass in seconds.

use std::collections::VecDeque;
use std::fmt;
use std::ops::RangeInclusive;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use chrono::Utc;
use futures::{SinkExt, StreamExt};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::net::TcpStream;
use tokio::sync::mpsc::UnboundedSender;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderValue, header};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

use crate::messages::{
    AcChargingParameters, AuthorizationStatus, AuthorizeRequest, AuthorizeResponse,
    BootNotificationRequest, BootNotificationResponse, BootReason, CancelReservationRequest,
    CancelReservationResponse, CancelReservationStatus, ChargingNeeds, ChargingProfile,
    ChargingProfilePurpose, ChargingProfileStatus, ChargingRateUnit, ChargingStation,
    ClearChargingProfileRequest, ClearChargingProfileResponse, ClearChargingProfileStatus,
    ConnectorStatus, DEFAULT_PHASES, Evse, HeartbeatRequest, IdToken, MeterValue,
    NOMINAL_VOLTAGE_V, NotifyEvChargingNeedsRequest, RegistrationStatus, RequestStartStopStatus,
    RequestStopTransactionRequest, RequestStopTransactionResponse, ReserveNowRequest,
    ReserveNowResponse, ReserveNowStatus, SampledValue, SetChargingProfileRequest,
    SetChargingProfileResponse, StatusNotificationRequest, TransactionEventKind,
    TransactionEventRequest, TransactionInfo, UnitOfMeasure,
};
use crate::rpc::{self, ErrorCode, Frame, Violation, to_payload};
use crate::server::{CLOSE_TIMEOUT, SUBPROTOCOL, ws_config};

/// A station's most power, W: a 32 A three-phase AC wallbox.
pub const DEFAULT_MAX_POWER_W: f64 = 22_000.0;
/// How long a station waits for the answer to one of its CALLs before carrying on.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// What a reserved car wants when nothing stops it first: more than any car holds, so it
/// charges until the CSMS stops it (RequestStopTransaction).
pub const DEFAULT_RESERVED_ENERGY_WH: f64 = 100_000.0;
/// OCPP's bound on `idToken` and `transactionId`.
const MAX_TOKEN_CHARS: usize = 36;
/// How long opening a connection (TCP and the HTTP upgrade) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// What the simulated stations do, and where they connect.
#[derive(Clone)]
pub struct SimConfig {
    /// The CSMS's base URL, e.g. `ws://127.0.0.1:9000/ocpp`; each station appends its id as a
    /// path segment.
    pub url: String,
    /// The stations: id and plain password (HTTP Basic).
    pub stations: Vec<(String, String)>,
    /// The most power each station draws, W.
    pub max_power_w: f64,
    /// Simulated seconds per real second: energy is `power × real time × time_scale`, and a
    /// stay of `s` simulated seconds lasts `s / time_scale` real seconds.
    pub time_scale: f64,
    /// Real time between a transaction's meter reports (TransactionEvent Updated).
    pub meter_interval: Duration,
    /// Mean real time between walk-in cars at one free station (exponential gaps); `None`:
    /// no walk-ins, only reserved cars.
    pub walk_in_every: Option<Duration>,
    /// What a walk-in car needs, Wh (uniform).
    pub walk_in_energy_wh: RangeInclusive<f64>,
    /// How long a walk-in car stays, simulated time (uniform).
    pub walk_in_stay: RangeInclusive<Duration>,
    /// What a reserved car charges at most, Wh.
    pub reserved_energy_wh: f64,
    /// Real time between an accepted ReserveNow and its car plugging in.
    pub reserved_arrival_delay: Duration,
    /// Misbehave: always draw `max_power_w`, whatever the CSMS limits (and still answer its
    /// profiles `Accepted`).
    pub ignore_limits: bool,
    /// Real time between a dropped connection and the next attempt.
    pub reconnect_delay: Duration,
    /// Seed of the walk-in schedule and car needs (each station draws from its own stream).
    pub seed: u64,
}

impl SimConfig {
    /// `stations` at `url`, with the defaults: 22 kW, real time, meter reports every second,
    /// no walk-ins (5–30 kWh and 2–8 h stays when enabled), reserved cars 1 s after their
    /// reservation, reconnects after 1 s.
    pub fn new(url: impl Into<String>, stations: Vec<(String, String)>) -> Self {
        Self {
            url: url.into(),
            stations,
            max_power_w: DEFAULT_MAX_POWER_W,
            time_scale: 1.0,
            meter_interval: Duration::from_secs(1),
            walk_in_every: None,
            walk_in_energy_wh: 5_000.0..=30_000.0,
            walk_in_stay: Duration::from_secs(2 * 3600)..=Duration::from_secs(8 * 3600),
            reserved_energy_wh: DEFAULT_RESERVED_ENERGY_WH,
            reserved_arrival_delay: Duration::from_secs(1),
            ignore_limits: false,
            reconnect_delay: Duration::from_secs(1),
            seed: 0,
        }
    }
}

// By hand: the derived one would print every station's password.
impl fmt::Debug for SimConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimConfig")
            .field("url", &self.url)
            .field("stations", &self.stations.len())
            .field("max_power_w", &self.max_power_w)
            .field("time_scale", &self.time_scale)
            .field("meter_interval", &self.meter_interval)
            .field("walk_in_every", &self.walk_in_every)
            .field("walk_in_energy_wh", &self.walk_in_energy_wh)
            .field("walk_in_stay", &self.walk_in_stay)
            .field("reserved_energy_wh", &self.reserved_energy_wh)
            .field("reserved_arrival_delay", &self.reserved_arrival_delay)
            .field("ignore_limits", &self.ignore_limits)
            .field("reconnect_delay", &self.reconnect_delay)
            .field("seed", &self.seed)
            .finish()
    }
}

/// Why a car's transaction ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// The car has the energy it wanted.
    EnergyReached,
    /// Its stay is over.
    Departed,
    /// The CSMS stopped it (RequestStopTransaction).
    RemoteStop,
}

impl EndReason {
    /// The TransactionEvent's `triggerReason`.
    pub fn trigger_reason(self) -> &'static str {
        match self {
            Self::EnergyReached => "EnergyLimitReached",
            Self::Departed => "EVDeparted",
            Self::RemoteStop => "RemoteStop",
        }
    }

    /// The transaction's `stoppedReason`.
    pub fn stopped_reason(self) -> &'static str {
        match self {
            Self::EnergyReached => "Local",
            Self::Departed => "EVDisconnected",
            Self::RemoteStop => "Remote",
        }
    }
}

/// What happened at a station, for whoever watches (tests, the CLI's logs).
#[derive(Debug, Clone, PartialEq)]
pub enum SimEvent {
    /// The WebSocket is open.
    Connected { station: String },
    /// The WebSocket closed or failed; the station reconnects.
    Disconnected { station: String },
    /// The CSMS refused the upgrade with this HTTP status; the station stops.
    Refused { station: String, status: u16 },
    /// A SetChargingProfile for the transaction, its limit in W.
    Limit {
        station: String,
        transaction_id: String,
        limit_w: f64,
        at: std::time::Instant,
    },
    /// A transaction started (TransactionEvent Started queued).
    Started {
        station: String,
        transaction_id: String,
        id_token: String,
    },
    /// A transaction ended (TransactionEvent Ended queued) with this much energy.
    Ended {
        station: String,
        transaction_id: String,
        energy_wh: f64,
        reason: EndReason,
    },
}

/// What the stations did, summed when they stop.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Report {
    pub stations: usize,
    /// Stations that connected at least once.
    pub connected: usize,
    /// Connections opened, reconnections included.
    pub connections: u64,
    /// Stations the CSMS refused (and that stopped).
    pub refused: usize,
    pub transactions_started: u64,
    pub transactions_ended: u64,
    /// Energy drawn by every transaction, those still going at shutdown included, Wh.
    pub energy_wh: f64,
    /// SetChargingProfile requests received.
    pub profiles_received: u64,
    /// WebSocket text frames sent: CALLs and answers.
    pub frames_sent: u64,
}

impl Report {
    fn add(&mut self, other: &Report) {
        self.stations += other.stations;
        self.connected += other.connected;
        self.connections += other.connections;
        self.refused += other.refused;
        self.transactions_started += other.transactions_started;
        self.transactions_ended += other.transactions_ended;
        self.energy_wh += other.energy_wh;
        self.profiles_received += other.profiles_received;
        self.frames_sent += other.frames_sent;
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} stations: {} connected ({} connections), {} refused; {} transactions started, \
             {} ended; {:.1} kWh; {} charging profiles received; {} frames sent",
            self.stations,
            self.connected,
            self.connections,
            self.refused,
            self.transactions_started,
            self.transactions_ended,
            self.energy_wh / 1000.0,
            self.profiles_received,
            self.frames_sent
        )
    }
}

/// Runs every station of `config` until `shutdown` (or until the CSMS refused them all) and
/// sums what they did. Events go to `observer` when given.
pub async fn run(
    config: SimConfig,
    observer: Option<UnboundedSender<SimEvent>>,
    shutdown: CancellationToken,
) -> Report {
    let config = Arc::new(config);
    let mut tasks = tokio::task::JoinSet::new();
    for (index, (id, password)) in config.stations.iter().enumerate() {
        let station = Station::new(index, id, password, config.clone(), observer.clone());
        tasks.spawn(station.run(shutdown.clone()));
    }
    let mut report = Report::default();
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok(one) => report.add(&one),
            Err(e) => tracing::error!(error = %e, "a simulated station's task failed"),
        }
    }
    report
}

/// A limit in amperes per phase, in W (230 V per phase; 3 phases unless said).
pub fn amps_to_watts(amps: f64, phases: Option<i32>) -> f64 {
    amps * NOMINAL_VOLTAGE_V * f64::from(phases.unwrap_or(DEFAULT_PHASES))
}

/// The limit a charging profile sets from its start, in W: its first schedule's first period.
/// `None` when it has no period, or its limit is negative or not a number.
pub fn profile_limit_w(profile: &ChargingProfile) -> Option<f64> {
    let schedule = profile.charging_schedule.first()?;
    let period = schedule.charging_schedule_period.first()?;
    let limit = match schedule.charging_rate_unit {
        ChargingRateUnit::W => period.limit,
        ChargingRateUnit::A => amps_to_watts(period.limit, period.number_phases),
    };
    (limit.is_finite() && limit >= 0.0).then_some(limit)
}

/// The power a station draws, W: the CSMS's limit (none: no limit) within the station's
/// maximum, or the maximum whatever the limit when it ignores limits.
pub fn drawn_power_w(limit_w: Option<f64>, max_power_w: f64, ignore_limits: bool) -> f64 {
    match limit_w {
        Some(limit) if !ignore_limits => limit.min(max_power_w),
        _ => max_power_w,
    }
}

/// The energy register after drawing `power_w` for `real_elapsed` at `time_scale`, Wh, never
/// past what the car needs.
pub fn integrate_wh(
    energy_wh: f64,
    need_wh: f64,
    power_w: f64,
    real_elapsed: Duration,
    time_scale: f64,
) -> f64 {
    let simulated_h = real_elapsed.as_secs_f64() * time_scale / 3600.0;
    (energy_wh + power_w * simulated_h).min(need_wh.max(energy_wh))
}

/// A CALL the station makes.
#[derive(Debug, Clone)]
struct Outgoing {
    action: &'static str,
    payload: Value,
}

#[derive(Debug)]
struct InFlight {
    id: String,
    call: Outgoing,
    deadline: Instant,
}

/// Why a CALL of ours got no result.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Failure {
    Error(ErrorCode),
    Timeout,
}

/// A car at the station.
#[derive(Debug)]
struct Car {
    id_token: IdToken,
    need_wh: f64,
    /// Its stay in simulated time; `None`: until it is full or stopped (reserved cars).
    stay: Option<Duration>,
    /// When it leaves (real time), from its arrival.
    departs_at: Option<Instant>,
    /// Its transaction, once authorized.
    tx: Option<Tx>,
}

#[derive(Debug)]
struct Tx {
    id: String,
    seq_no: i32,
    energy_wh: f64,
    /// The limit in force, W: its own TxProfile's, else the station's TxDefaultProfile's;
    /// `None`: neither (the station's most).
    limit_w: Option<f64>,
    /// `limit_w` is the transaction's own (a TxProfile), not the station's default.
    own_limit: bool,
    integrated_to: Instant,
    next_meter: Instant,
}

#[derive(Debug)]
struct Reservation {
    id: i32,
    id_token: IdToken,
    arrives_at: Instant,
}

/// How a connection ended.
#[derive(Debug, PartialEq, Eq)]
enum SessionEnd {
    Dropped,
    Shutdown,
}

enum Attempt {
    Open(Box<WebSocketStream<MaybeTlsStream<TcpStream>>>),
    Refused(u16),
    Failed(String),
}

/// One simulated station: its state across connections.
struct Station {
    id: String,
    /// The `Authorization` header value (HTTP Basic).
    authorization: String,
    config: Arc<SimConfig>,
    observer: Option<UnboundedSender<SimEvent>>,
    rng: StdRng,
    report: Report,
    booted: bool,
    boot_retry_at: Option<Instant>,
    heartbeat_every: Option<Duration>,
    next_heartbeat: Option<Instant>,
    /// CALLs waiting their turn: one is in flight at a time (OCPP-J). Kept across reconnects,
    /// so a transaction's events reach the CSMS in order.
    outbox: VecDeque<Outgoing>,
    in_flight: Option<InFlight>,
    car: Option<Car>,
    /// The station's TxDefaultProfile limit (W): a transaction's limit until it has its own.
    default_limit_w: Option<f64>,
    reservation: Option<Reservation>,
    next_walk_in: Option<Instant>,
    /// Cars so far (walk-in tokens are numbered).
    cars: u64,
}

impl Station {
    fn new(
        index: usize,
        id: &str,
        password: &str,
        config: Arc<SimConfig>,
        observer: Option<UnboundedSender<SimEvent>>,
    ) -> Self {
        let credentials =
            base64::engine::general_purpose::STANDARD.encode(format!("{id}:{password}"));
        // One stream per station, all from the one seed: a station's cars do not depend on
        // how the others' tasks are scheduled.
        let seed = config.seed ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        Self {
            id: id.to_owned(),
            authorization: format!("Basic {credentials}"),
            config,
            observer,
            rng: StdRng::seed_from_u64(seed),
            report: Report {
                stations: 1,
                ..Report::default()
            },
            booted: false,
            boot_retry_at: None,
            heartbeat_every: None,
            next_heartbeat: None,
            outbox: VecDeque::new(),
            in_flight: None,
            car: None,
            default_limit_w: None,
            reservation: None,
            next_walk_in: None,
            cars: 0,
        }
    }

    async fn run(mut self, shutdown: CancellationToken) -> Report {
        // Failed attempts in a row.
        let mut failures = 0u64;
        loop {
            let attempt = tokio::select! {
                _ = shutdown.cancelled() => break,
                attempt = self.connect() => attempt,
            };
            match attempt {
                Attempt::Open(ws) => {
                    failures = 0;
                    self.report.connections += 1;
                    self.report.connected = 1;
                    tracing::debug!(station = %self.id, "connected");
                    self.emit(SimEvent::Connected {
                        station: self.id.clone(),
                    });
                    if self.session(*ws, &shutdown).await == SessionEnd::Shutdown {
                        break;
                    }
                    tracing::info!(station = %self.id, "connection dropped; reconnecting");
                    self.emit(SimEvent::Disconnected {
                        station: self.id.clone(),
                    });
                }
                Attempt::Refused(status) => {
                    // A refusal is the CSMS's answer about this station (wrong password,
                    // unknown id): asking again would be refused again.
                    tracing::warn!(station = %self.id, status, "the CSMS refused the station");
                    self.report.refused = 1;
                    self.emit(SimEvent::Refused {
                        station: self.id.clone(),
                        status,
                    });
                    break;
                }
                Attempt::Failed(error) => {
                    // Once per outage: a thousand stations retrying every second would bury
                    // the log.
                    if failures == 0 {
                        tracing::warn!(station = %self.id, %error, "cannot connect; retrying");
                    } else {
                        tracing::debug!(station = %self.id, %error, "cannot connect; retrying");
                    }
                    failures += 1;
                }
            }
            let retry_at = Instant::now() + self.config.reconnect_delay;
            if !self.offline_until(retry_at, &shutdown).await {
                break;
            }
        }
        // A transaction still going is left as it is (no Ended): its energy so far counts.
        let now = Instant::now();
        self.integrate(now);
        if let Some(tx) = self.car.as_ref().and_then(|c| c.tx.as_ref()) {
            self.report.energy_wh += tx.energy_wh;
        }
        self.report
    }

    async fn connect(&self) -> Attempt {
        let url = format!("{}/{}", self.config.url.trim_end_matches('/'), self.id);
        let mut request = match url.as_str().into_client_request() {
            Ok(request) => request,
            Err(e) => return Attempt::Failed(format!("bad URL {url}: {e}")),
        };
        let headers = request.headers_mut();
        match HeaderValue::from_str(&self.authorization) {
            Ok(value) => headers.insert(header::AUTHORIZATION, value),
            Err(e) => return Attempt::Failed(format!("bad credentials: {e}")),
        };
        headers.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(SUBPROTOCOL),
        );
        // Small buffers: a thousand idle stations in one process should cost megabytes.
        let ws_config = ws_config(0);
        let connecting =
            tokio_tungstenite::connect_async_with_config(request, Some(ws_config), true);
        match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
            Ok(Ok((ws, _))) => Attempt::Open(Box::new(ws)),
            Ok(Err(tungstenite::Error::Http(response))) if response.status().is_client_error() => {
                Attempt::Refused(response.status().as_u16())
            }
            Ok(Err(e)) => Attempt::Failed(e.to_string()),
            Err(_) => Attempt::Failed(format!("no answer within {CONNECT_TIMEOUT:?}")),
        }
    }

    /// One connection, until it drops or `shutdown`.
    async fn session(
        &mut self,
        mut ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
        shutdown: &CancellationToken,
    ) -> SessionEnd {
        // Message ids need only be unique within a connection.
        let mut next_id: u64 = 0;
        loop {
            let now = Instant::now();
            self.advance(now, true);
            if self.in_flight.as_ref().is_some_and(|f| f.deadline <= now)
                && let Some(late) = self.in_flight.take()
            {
                tracing::warn!(station = %self.id, action = late.call.action, "no answer within 30 s; carrying on");
                self.on_result(late.call, Err(Failure::Timeout), now);
                continue;
            }
            if self.in_flight.is_none()
                && let Some(call) = self.next_call(now)
            {
                next_id += 1;
                let id = next_id.to_string();
                let frame = Frame::Call {
                    id: id.clone(),
                    action: call.action.to_owned(),
                    payload: call.payload.clone(),
                };
                self.in_flight = Some(InFlight {
                    id,
                    call,
                    deadline: now + CALL_TIMEOUT,
                });
                if ws.send(Message::text(frame.to_text())).await.is_err() {
                    self.requeue_in_flight();
                    return SessionEnd::Dropped;
                }
                self.report.frames_sent += 1;
                continue;
            }
            let wake = self
                .next_deadline(true)
                .unwrap_or(now + Duration::from_secs(3600));
            let received = tokio::select! {
                _ = shutdown.cancelled() => {
                    let _ = tokio::time::timeout(CLOSE_TIMEOUT, ws.close(None)).await;
                    return SessionEnd::Shutdown;
                }
                _ = tokio::time::sleep_until(wake) => continue,
                received = ws.next() => received,
            };
            let text = match received {
                Some(Ok(Message::Text(text))) => text,
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => {
                    self.requeue_in_flight();
                    return SessionEnd::Dropped;
                }
                // Pings are answered by tungstenite; OCPP-J has no binary messages.
                Some(Ok(_)) => continue,
            };
            let reply = self.on_text(text.as_str(), Instant::now());
            if let Some(reply) = reply {
                if ws.send(Message::text(reply.to_text())).await.is_err() {
                    self.requeue_in_flight();
                    return SessionEnd::Dropped;
                }
                self.report.frames_sent += 1;
            }
        }
    }

    /// Waits offline until `until` (the car charges on); false on shutdown.
    async fn offline_until(&mut self, until: Instant, shutdown: &CancellationToken) -> bool {
        loop {
            let now = Instant::now();
            self.advance(now, false);
            if now >= until {
                return true;
            }
            let wake = self.next_deadline(false).map_or(until, |d| d.min(until));
            tokio::select! {
                _ = shutdown.cancelled() => return false,
                _ = tokio::time::sleep_until(wake) => {}
            }
        }
    }

    /// The CALL in flight goes first after a reconnect (its answer never came), but for
    /// those that only matter on the connection they were sent on.
    fn requeue_in_flight(&mut self) {
        if let Some(f) = self.in_flight.take()
            && !matches!(f.call.action, "BootNotification" | "Heartbeat")
        {
            self.outbox.push_front(f.call);
        }
    }

    /// The next CALL to send, if one may go now: nothing but BootNotification until booted.
    fn next_call(&mut self, now: Instant) -> Option<Outgoing> {
        if self.booted {
            return self.outbox.pop_front();
        }
        if self.boot_retry_at.is_some_and(|at| at > now) {
            return None;
        }
        self.boot_retry_at = None;
        Some(call(
            "BootNotification",
            BootNotificationRequest {
                reason: BootReason::PowerUp,
                charging_station: ChargingStation {
                    model: "sim-station".into(),
                    vendor_name: "evgrid".into(),
                    serial_number: None,
                    firmware_version: None,
                },
            },
        ))
    }

    /// The earliest time something is due.
    fn next_deadline(&self, online: bool) -> Option<Instant> {
        let mut due: Vec<Option<Instant>> = Vec::with_capacity(8);
        if let Some(car) = &self.car {
            due.push(car.departs_at);
            if let Some(tx) = &car.tx {
                if online {
                    due.push(Some(tx.next_meter));
                }
                let power = self.power_w(tx);
                if power > 0.0 {
                    let missing_h = (car.need_wh - tx.energy_wh).max(0.0) / power;
                    let real_s = missing_h * 3600.0 / self.config.time_scale;
                    due.push(
                        Duration::try_from_secs_f64(real_s)
                            .ok()
                            .map(|d| tx.integrated_to + d),
                    );
                }
            }
        }
        if online {
            due.push(self.in_flight.as_ref().map(|f| f.deadline));
            due.push(self.boot_retry_at);
            if self.booted {
                due.push(self.next_heartbeat);
                due.push(self.next_walk_in);
                due.push(self.reservation.as_ref().map(|r| r.arrives_at));
            }
        }
        due.into_iter().flatten().min()
    }

    fn power_w(&self, tx: &Tx) -> f64 {
        drawn_power_w(
            tx.limit_w,
            self.config.max_power_w,
            self.config.ignore_limits,
        )
    }

    /// Brings the energy register of the transaction up to `now`, at the limit in force.
    fn integrate(&mut self, now: Instant) {
        let (max, ignore, scale) = (
            self.config.max_power_w,
            self.config.ignore_limits,
            self.config.time_scale,
        );
        if let Some(car) = &mut self.car
            && let Some(tx) = &mut car.tx
        {
            let power = drawn_power_w(tx.limit_w, max, ignore);
            let elapsed = now.saturating_duration_since(tx.integrated_to);
            tx.energy_wh = integrate_wh(tx.energy_wh, car.need_wh, power, elapsed, scale);
            tx.integrated_to = now;
        }
    }

    /// Does what is due at `now`: the car's charging, meter reports, its leaving, heartbeats,
    /// arrivals. Offline, only the car goes on (no arrivals; meter reports wait).
    fn advance(&mut self, now: Instant, online: bool) {
        self.integrate(now);
        let leaving = self.car.as_ref().and_then(|car| {
            let gone = car.departs_at.is_some_and(|at| at <= now);
            match &car.tx {
                Some(tx) if tx.energy_wh >= car.need_wh - 1e-6 => Some(EndReason::EnergyReached),
                Some(_) if gone => Some(EndReason::Departed),
                // A car whose Authorize is still unanswered leaves too, without a transaction.
                None if gone && online => Some(EndReason::Departed),
                _ => None,
            }
        });
        match leaving {
            Some(reason) if self.car.as_ref().is_some_and(|c| c.tx.is_some()) => {
                self.end_transaction(reason, now);
            }
            Some(_) => {
                self.car = None;
                self.queue_status(ConnectorStatus::Available);
                self.schedule_walk_in(now);
            }
            None if online => self.meter_report(now),
            None => {}
        }
        if !online || !self.booted {
            return;
        }
        if self.next_heartbeat.is_some_and(|at| at <= now) {
            let queued = self.outbox.iter().any(|c| c.action == "Heartbeat")
                || self
                    .in_flight
                    .as_ref()
                    .is_some_and(|f| f.call.action == "Heartbeat");
            if !queued {
                self.outbox
                    .push_back(call("Heartbeat", HeartbeatRequest {}));
            }
            self.next_heartbeat = self.heartbeat_every.map(|every| now + every);
        }
        if self.car.is_none()
            && self
                .reservation
                .as_ref()
                .is_some_and(|r| r.arrives_at <= now)
            && let Some(reservation) = self.reservation.take()
        {
            // A reserved car comes for its request: the CSMS knows what it needs and when it
            // leaves, so it states no needs of its own and charges until stopped.
            self.arrive(
                reservation.id_token,
                self.config.reserved_energy_wh,
                None,
                now,
            );
        }
        if self.next_walk_in.is_some_and(|at| at <= now) {
            self.next_walk_in = None;
            if self.car.is_none() && self.reservation.is_none() {
                self.cars += 1;
                let token = bounded_token("walkin", &self.id, self.cars);
                let need = sample(&mut self.rng, &self.config.walk_in_energy_wh);
                let stay = Duration::from_secs_f64(sample(
                    &mut self.rng,
                    &(self.config.walk_in_stay.start().as_secs_f64()
                        ..=self.config.walk_in_stay.end().as_secs_f64()),
                ));
                let id_token = IdToken {
                    id_token: token,
                    kind: "Local".into(),
                };
                self.arrive(id_token, need, Some(stay), now);
            } else {
                self.schedule_walk_in(now);
            }
        }
    }

    /// Queues a meter report when one is due.
    fn meter_report(&mut self, now: Instant) {
        let interval = self.config.meter_interval;
        let Some(tx) = self.car.as_ref().and_then(|c| c.tx.as_ref()) else {
            return;
        };
        if tx.next_meter > now {
            return;
        }
        // A CSMS slow to answer gets the newest reading when it is ready, not a backlog.
        let backlog = self
            .outbox
            .iter()
            .any(|c| c.action == "TransactionEvent" && c.payload["eventType"] == "Updated");
        if backlog {
            if let Some(tx) = self.car.as_mut().and_then(|c| c.tx.as_mut()) {
                tx.next_meter = now + interval;
            }
            return;
        }
        let power = self.power_w(tx);
        let Some(tx) = self.car.as_mut().and_then(|c| c.tx.as_mut()) else {
            return;
        };
        tx.seq_no += 1;
        tx.next_meter = now + interval;
        let event = TransactionEventRequest {
            event_type: TransactionEventKind::Updated,
            timestamp: Utc::now(),
            trigger_reason: "MeterValuePeriodic".into(),
            seq_no: tx.seq_no,
            transaction_info: TransactionInfo {
                transaction_id: tx.id.clone(),
                charging_state: Some(
                    if power > 0.0 {
                        "Charging"
                    } else {
                        "SuspendedEVSE"
                    }
                    .into(),
                ),
                stopped_reason: None,
            },
            id_token: None,
            evse: None,
            meter_value: Some(vec![meter_value(tx.energy_wh, Some(power))]),
        };
        self.outbox.push_back(call("TransactionEvent", event));
    }

    /// A car plugs in and asks to be authorized.
    fn arrive(&mut self, id_token: IdToken, need_wh: f64, stay: Option<Duration>, now: Instant) {
        self.next_walk_in = None;
        let departs_at = stay.map(|s| now + real_time(s, self.config.time_scale));
        self.queue_status(ConnectorStatus::Occupied);
        self.outbox.push_back(call(
            "Authorize",
            AuthorizeRequest {
                id_token: id_token.clone(),
            },
        ));
        self.car = Some(Car {
            id_token,
            need_wh,
            stay,
            departs_at,
            tx: None,
        });
    }

    /// The car is authorized: its transaction starts, and it states its needs.
    fn start_transaction(&mut self, now: Instant) {
        let (time_scale, interval) = (self.config.time_scale, self.config.meter_interval);
        let default_limit_w = self.default_limit_w;
        let Some(car) = self.car.as_mut().filter(|c| c.tx.is_none()) else {
            return;
        };
        // A fresh UUID, not a counter: a CSMS keeps the transactions of earlier runs, and
        // takes nothing older than the seqNo it has for an id it knows.
        let id = uuid::Uuid::new_v4().to_string();
        car.tx = Some(Tx {
            id: id.clone(),
            seq_no: 0,
            energy_wh: 0.0,
            limit_w: default_limit_w,
            own_limit: false,
            integrated_to: now,
            next_meter: now + interval,
        });
        let started = TransactionEventRequest {
            event_type: TransactionEventKind::Started,
            timestamp: Utc::now(),
            trigger_reason: "Authorized".into(),
            seq_no: 0,
            transaction_info: TransactionInfo {
                transaction_id: id.clone(),
                charging_state: Some("Charging".into()),
                stopped_reason: None,
            },
            id_token: Some(car.id_token.clone()),
            evse: Some(Evse {
                id: 1,
                connector_id: Some(1),
            }),
            meter_value: Some(vec![meter_value(0.0, None)]),
        };
        self.outbox.push_back(call("TransactionEvent", started));
        if let Some(stay) = car.stay {
            let departure = chrono::TimeDelta::from_std(real_time(stay, time_scale))
                .ok()
                .and_then(|d| Utc::now().checked_add_signed(d));
            let needs = NotifyEvChargingNeedsRequest {
                evse_id: 1,
                charging_needs: ChargingNeeds {
                    requested_energy_transfer: "AC_three_phase".into(),
                    departure_time: departure,
                    ac_charging_parameters: Some(AcChargingParameters {
                        energy_amount: car.need_wh,
                        ev_min_current: 6.0,
                        ev_max_current: 32.0,
                        ev_max_voltage: 400.0,
                    }),
                    dc_charging_parameters: None,
                },
                max_schedule_tuples: None,
            };
            self.outbox.push_back(call("NotifyEVChargingNeeds", needs));
        }
        self.report.transactions_started += 1;
        let id_token = car.id_token.id_token.clone();
        tracing::debug!(station = %self.id, transaction = %id, token = %id_token, "transaction started");
        self.emit(SimEvent::Started {
            station: self.id.clone(),
            transaction_id: id,
            id_token,
        });
    }

    /// Ends the car's transaction (the car leaves) and frees the station.
    fn end_transaction(&mut self, reason: EndReason, now: Instant) {
        self.integrate(now);
        let Some(Car { tx: Some(tx), .. }) = self.car.take() else {
            return;
        };
        let ended = TransactionEventRequest {
            event_type: TransactionEventKind::Ended,
            timestamp: Utc::now(),
            trigger_reason: reason.trigger_reason().into(),
            seq_no: tx.seq_no + 1,
            transaction_info: TransactionInfo {
                transaction_id: tx.id.clone(),
                charging_state: Some("Idle".into()),
                stopped_reason: Some(reason.stopped_reason().into()),
            },
            id_token: None,
            evse: None,
            meter_value: Some(vec![meter_value(tx.energy_wh, None)]),
        };
        self.outbox.push_back(call("TransactionEvent", ended));
        self.queue_status(ConnectorStatus::Available);
        self.report.transactions_ended += 1;
        self.report.energy_wh += tx.energy_wh;
        tracing::debug!(station = %self.id, transaction = %tx.id, energy_wh = tx.energy_wh, ?reason, "transaction ended");
        self.emit(SimEvent::Ended {
            station: self.id.clone(),
            transaction_id: tx.id,
            energy_wh: tx.energy_wh,
            reason,
        });
        self.schedule_walk_in(now);
    }

    fn schedule_walk_in(&mut self, now: Instant) {
        if let Some(mean) = self.config.walk_in_every {
            // Exponential gaps: walk-ins at one station are a Poisson process.
            let u: f64 = self.rng.random();
            let gap = -mean.as_secs_f64() * (1.0 - u).ln();
            self.next_walk_in = Some(now + Duration::from_secs_f64(gap.min(1e9)));
        }
    }

    fn queue_status(&mut self, status: ConnectorStatus) {
        self.outbox.push_back(status_call(status));
    }

    /// The connector's status as it is now.
    fn status(&self) -> ConnectorStatus {
        match (&self.car, &self.reservation) {
            (Some(_), _) => ConnectorStatus::Occupied,
            (None, Some(_)) => ConnectorStatus::Reserved,
            (None, None) => ConnectorStatus::Available,
        }
    }

    /// Takes in one message from the CSMS; returns the answer to send, if any.
    fn on_text(&mut self, text: &str, now: Instant) -> Option<Frame> {
        match Frame::parse(text) {
            Ok(Frame::Call {
                id,
                action,
                payload,
            }) => Some(Frame::reply(id, self.answer(&action, payload, now))),
            Ok(Frame::CallResult { id, payload }) => {
                if let Some(call) = self.take_in_flight(&id) {
                    self.on_result(call, Ok(payload), now);
                }
                None
            }
            Ok(Frame::CallError {
                id,
                code,
                description,
                ..
            }) => {
                if let Some(call) = self.take_in_flight(&id) {
                    tracing::debug!(station = %self.id, action = call.action, ?code, %description, "CALLERROR");
                    self.on_result(call, Err(Failure::Error(code)), now);
                }
                None
            }
            Err(e) => {
                tracing::warn!(station = %self.id, error = %e, "a message that is not OCPP-J");
                e.answer()
            }
        }
    }

    /// The CALL in flight, if `id` answers it (a late answer to a timed-out one does not).
    fn take_in_flight(&mut self, id: &str) -> Option<Outgoing> {
        if self.in_flight.as_ref().is_some_and(|f| f.id == id) {
            return self.in_flight.take().map(|f| f.call);
        }
        None
    }

    /// What the answer to one of our CALLs changes.
    fn on_result(&mut self, call: Outgoing, result: Result<Value, Failure>, now: Instant) {
        match (call.action, result) {
            ("BootNotification", Ok(payload)) => {
                match serde_json::from_value::<BootNotificationResponse>(payload) {
                    Ok(boot) if boot.status == RegistrationStatus::Accepted => {
                        self.booted = true;
                        self.heartbeat_every = u64::try_from(boot.interval)
                            .ok()
                            .filter(|s| *s > 0)
                            .map(Duration::from_secs);
                        self.next_heartbeat = self.heartbeat_every.map(|every| now + every);
                        // The CSMS learns the connector's state anew after every boot.
                        self.outbox.push_front(status_call(self.status()));
                        if self.car.is_none() && self.next_walk_in.is_none() {
                            self.schedule_walk_in(now);
                        }
                    }
                    Ok(boot) => {
                        let wait = u64::try_from(boot.interval)
                            .ok()
                            .filter(|s| *s > 0)
                            .map_or(self.config.reconnect_delay, Duration::from_secs);
                        self.boot_retry_at = Some(now + wait);
                    }
                    Err(e) => {
                        tracing::warn!(station = %self.id, error = %e, "unreadable boot answer");
                        self.boot_retry_at = Some(now + self.config.reconnect_delay);
                    }
                }
            }
            ("BootNotification", Err(_)) => {
                self.boot_retry_at = Some(now + self.config.reconnect_delay);
            }
            ("Authorize", result) => {
                let accepted = result
                    .ok()
                    .and_then(|p| serde_json::from_value::<AuthorizeResponse>(p).ok())
                    .is_some_and(|a| a.id_token_info.status == AuthorizationStatus::Accepted);
                if accepted {
                    self.start_transaction(now);
                } else if self.car.as_ref().is_some_and(|c| c.tx.is_none()) {
                    // Not authorized: the car leaves without charging.
                    self.car = None;
                    self.queue_status(ConnectorStatus::Available);
                    self.schedule_walk_in(now);
                }
            }
            // The CSMS forgot this station (it restarted): boot again, then resend.
            (_, Err(Failure::Error(ErrorCode::SecurityError))) if self.booted => {
                self.booted = false;
                if call.action != "Heartbeat" {
                    self.outbox.push_front(call);
                }
            }
            _ => {}
        }
    }

    /// Answers one CALL of the CSMS.
    fn answer(&mut self, action: &str, payload: Value, now: Instant) -> Result<Value, Violation> {
        match action {
            "ReserveNow" => {
                let request: ReserveNowRequest = rpc::payload(payload)?;
                let status = if request.evse_id.is_some_and(|e| e != 1) {
                    ReserveNowStatus::Rejected
                } else if self.car.is_some() || self.reservation.is_some() {
                    ReserveNowStatus::Occupied
                } else {
                    self.reservation = Some(Reservation {
                        id: request.id,
                        id_token: request.id_token,
                        arrives_at: now + self.config.reserved_arrival_delay,
                    });
                    self.queue_status(ConnectorStatus::Reserved);
                    ReserveNowStatus::Accepted
                };
                Ok(to_payload(ReserveNowResponse { status }))
            }
            "CancelReservation" => {
                let request: CancelReservationRequest = rpc::payload(payload)?;
                let status = if self
                    .reservation
                    .as_ref()
                    .is_some_and(|r| r.id == request.reservation_id)
                {
                    self.reservation = None;
                    self.queue_status(self.status());
                    CancelReservationStatus::Accepted
                } else {
                    CancelReservationStatus::Rejected
                };
                Ok(to_payload(CancelReservationResponse { status }))
            }
            "SetChargingProfile" => {
                self.report.profiles_received += 1;
                let request: SetChargingProfileRequest = rpc::payload(payload)?;
                let status = self.set_profile(&request.charging_profile, now);
                Ok(to_payload(SetChargingProfileResponse { status }))
            }
            "ClearChargingProfile" => {
                let _: ClearChargingProfileRequest = rpc::payload(payload)?;
                self.integrate(now);
                let default_limit_w = self.default_limit_w;
                if let Some(tx) = self.car.as_mut().and_then(|c| c.tx.as_mut()) {
                    tx.limit_w = default_limit_w;
                    tx.own_limit = false;
                }
                Ok(to_payload(ClearChargingProfileResponse {
                    status: ClearChargingProfileStatus::Accepted,
                }))
            }
            "RequestStopTransaction" => {
                let request: RequestStopTransactionRequest = rpc::payload(payload)?;
                let ours = self
                    .car
                    .as_ref()
                    .and_then(|c| c.tx.as_ref())
                    .is_some_and(|tx| tx.id == request.transaction_id);
                let status = if ours {
                    // Queued after this answer is sent: the CSMS hears Accepted, then Ended.
                    self.end_transaction(EndReason::RemoteStop, now);
                    RequestStartStopStatus::Accepted
                } else {
                    RequestStartStopStatus::Rejected
                };
                Ok(to_payload(RequestStopTransactionResponse { status }))
            }
            other => Err((
                ErrorCode::NotImplemented,
                format!("{other} is not supported by this simulated station"),
            )),
        }
    }

    /// Applies a TxProfile for the transaction going on, or a TxDefaultProfile (the limit of
    /// transactions without their own); anything else is rejected (the simulated station has
    /// no station-wide limits).
    fn set_profile(&mut self, profile: &ChargingProfile, now: Instant) -> ChargingProfileStatus {
        let Some(limit_w) = profile_limit_w(profile) else {
            return ChargingProfileStatus::Rejected;
        };
        if profile.charging_profile_purpose == ChargingProfilePurpose::TxDefaultProfile {
            // OCPP: the default holds for every transaction without a TxProfile of its own,
            // one going on included.
            self.integrate(now);
            self.default_limit_w = Some(limit_w);
            if let Some(tx) = self.car.as_mut().and_then(|c| c.tx.as_mut())
                && !tx.own_limit
            {
                tx.limit_w = Some(limit_w);
            }
            return ChargingProfileStatus::Accepted;
        }
        let current = self
            .car
            .as_ref()
            .and_then(|c| c.tx.as_ref())
            .map(|tx| tx.id.clone());
        let Some(transaction_id) = current.filter(|id| {
            profile.charging_profile_purpose == ChargingProfilePurpose::TxProfile
                && profile.transaction_id.as_ref().is_none_or(|t| t == id)
        }) else {
            return ChargingProfileStatus::Rejected;
        };
        // What was drawn so far was drawn at the old limit.
        self.integrate(now);
        if let Some(tx) = self.car.as_mut().and_then(|c| c.tx.as_mut()) {
            tx.limit_w = Some(limit_w);
            tx.own_limit = true;
        }
        self.emit(SimEvent::Limit {
            station: self.id.clone(),
            transaction_id,
            limit_w,
            at: now.into_std(),
        });
        // A misbehaving station says Accepted too: that is the lie tests look for.
        ChargingProfileStatus::Accepted
    }

    fn emit(&self, event: SimEvent) {
        if let Some(observer) = &self.observer {
            let _ = observer.send(event);
        }
    }
}

fn call<T: Serialize>(action: &'static str, payload: T) -> Outgoing {
    Outgoing {
        action,
        payload: to_payload(payload),
    }
}

fn status_call(status: ConnectorStatus) -> Outgoing {
    call(
        "StatusNotification",
        StatusNotificationRequest {
            timestamp: Utc::now(),
            connector_status: status,
            evse_id: 1,
            connector_id: 1,
        },
    )
}

/// The energy register's reading (Wh), with the power drawn (W) in periodic reports.
fn meter_value(energy_wh: f64, power_w: Option<f64>) -> MeterValue {
    let mut sampled_value = vec![SampledValue {
        value: energy_wh,
        measurand: Some("Energy.Active.Import.Register".into()),
        unit_of_measure: Some(UnitOfMeasure {
            unit: Some("Wh".into()),
            multiplier: None,
        }),
    }];
    if let Some(power_w) = power_w {
        sampled_value.push(SampledValue {
            value: power_w,
            measurand: Some("Power.Active.Import".into()),
            unit_of_measure: Some(UnitOfMeasure {
                unit: Some("W".into()),
                multiplier: None,
            }),
        });
    }
    MeterValue {
        timestamp: Utc::now(),
        sampled_value,
    }
}

/// `<prefix>-<station>-<n>`, or with the station id's hash in its place when that would pass
/// OCPP's 36 characters (station ids may have 48).
fn bounded_token(prefix: &str, station: &str, n: u64) -> String {
    let token = format!("{prefix}-{station}-{n}");
    if token.len() <= MAX_TOKEN_CHARS {
        return token;
    }
    let digest = Sha256::digest(station.as_bytes());
    let short: String = digest[..6].iter().map(|b| format!("{b:02x}")).collect();
    format!("{prefix}-{short}-{n}")
}

/// The real time a simulated duration lasts.
fn real_time(simulated: Duration, time_scale: f64) -> Duration {
    Duration::try_from_secs_f64(simulated.as_secs_f64() / time_scale).unwrap_or(Duration::MAX)
}

fn sample(rng: &mut StdRng, range: &RangeInclusive<f64>) -> f64 {
    if range.start() >= range.end() {
        return *range.start();
    }
    rng.random_range(range.clone())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::messages::{ChargingProfileKind, ChargingSchedule, ChargingSchedulePeriod};

    fn profile(unit: ChargingRateUnit, periods: &[(f64, Option<i32>)]) -> ChargingProfile {
        ChargingProfile {
            id: 1,
            stack_level: 0,
            charging_profile_purpose: ChargingProfilePurpose::TxProfile,
            charging_profile_kind: ChargingProfileKind::Absolute,
            transaction_id: None,
            charging_schedule: vec![ChargingSchedule {
                id: 1,
                charging_rate_unit: unit,
                charging_schedule_period: periods
                    .iter()
                    .enumerate()
                    .map(|(i, &(limit, number_phases))| ChargingSchedulePeriod {
                        start_period: i as i32 * 600,
                        limit,
                        number_phases,
                    })
                    .collect(),
            }],
        }
    }

    #[test]
    fn limits_in_amperes_become_watts_per_phase() {
        assert_eq!(amps_to_watts(16.0, None), 16.0 * 230.0 * 3.0);
        assert_eq!(amps_to_watts(16.0, Some(1)), 3680.0);
        let amps = profile(ChargingRateUnit::A, &[(10.0, Some(3)), (32.0, None)]);
        assert_eq!(profile_limit_w(&amps), Some(6900.0));
        let single = profile(ChargingRateUnit::A, &[(32.0, Some(1))]);
        assert_eq!(profile_limit_w(&single), Some(7360.0));
        let default_phases = profile(ChargingRateUnit::A, &[(6.0, None)]);
        assert_eq!(profile_limit_w(&default_phases), Some(4140.0));
    }

    #[test]
    fn a_profile_reads_as_its_first_period_in_watts() {
        let watts = profile(ChargingRateUnit::W, &[(7000.0, None), (11000.0, None)]);
        assert_eq!(profile_limit_w(&watts), Some(7000.0));
        assert_eq!(profile_limit_w(&profile(ChargingRateUnit::W, &[])), None);
        assert_eq!(
            profile_limit_w(&profile(ChargingRateUnit::W, &[(-1.0, None)])),
            None
        );
        assert_eq!(
            profile_limit_w(&profile(ChargingRateUnit::W, &[(f64::NAN, None)])),
            None
        );
        let mut empty = watts.clone();
        empty.charging_schedule.clear();
        assert_eq!(profile_limit_w(&empty), None);
        // As the CSMS sends it.
        let sent: SetChargingProfileRequest = serde_json::from_value(json!({
            "evseId": 1,
            "chargingProfile": {
                "id": 4, "stackLevel": 0, "chargingProfilePurpose": "TxProfile",
                "chargingProfileKind": "Absolute", "transactionId": "tx-1",
                "chargingSchedule": [{"id": 1, "chargingRateUnit": "A",
                    "chargingSchedulePeriod": [{"startPeriod": 0, "limit": 16.0, "numberPhases": 1}]}]
            }
        }))
        .unwrap();
        assert_eq!(profile_limit_w(&sent.charging_profile), Some(3680.0));
    }

    #[test]
    fn power_is_the_limit_within_the_maximum_unless_limits_are_ignored() {
        assert_eq!(drawn_power_w(None, 22_000.0, false), 22_000.0);
        assert_eq!(drawn_power_w(Some(7_000.0), 22_000.0, false), 7_000.0);
        assert_eq!(drawn_power_w(Some(50_000.0), 22_000.0, false), 22_000.0);
        assert_eq!(drawn_power_w(Some(0.0), 22_000.0, false), 0.0);
        assert_eq!(drawn_power_w(Some(7_000.0), 22_000.0, true), 22_000.0);
    }

    #[test]
    fn energy_integrates_power_over_scaled_time_up_to_the_need() {
        let second = Duration::from_secs(1);
        // 11 kW for one real second at 3600×: one simulated hour.
        assert_eq!(
            integrate_wh(0.0, 50_000.0, 11_000.0, second, 3600.0),
            11_000.0
        );
        assert_eq!(
            integrate_wh(1_000.0, 50_000.0, 3_600.0, second, 1.0),
            1_001.0
        );
        assert_eq!(
            integrate_wh(0.0, 5_000.0, 11_000.0, second, 3600.0),
            5_000.0
        );
        assert_eq!(integrate_wh(7.0, 50_000.0, 0.0, second, 3600.0), 7.0);
        // A register never runs backwards, even past a need it already passed.
        assert_eq!(
            integrate_wh(6_000.0, 5_000.0, 11_000.0, second, 1.0),
            6_000.0
        );
    }

    #[test]
    fn tokens_stay_within_ocpp_bounds() {
        assert_eq!(bounded_token("walkin", "cs-1", 3), "walkin-cs-1-3");
        let long = "s".repeat(48);
        let token = bounded_token("walkin", &long, 12);
        assert!(token.len() <= MAX_TOKEN_CHARS, "{token}");
        assert_ne!(token, bounded_token("walkin", &"t".repeat(48), 12));
    }

    fn station(config: SimConfig) -> Station {
        Station::new(0, "cs-1", "plain-password-0123", Arc::new(config), None)
    }

    fn actions(station: &Station) -> Vec<&'static str> {
        station.outbox.iter().map(|c| c.action).collect()
    }

    fn accept_boot(station: &mut Station, now: Instant) {
        let boot = station.next_call(now).unwrap();
        assert_eq!(boot.action, "BootNotification");
        assert_eq!(boot.payload["reason"], "PowerUp");
        assert_eq!(boot.payload["chargingStation"]["vendorName"], "evgrid");
        let accepted =
            json!({"currentTime": "2027-01-15T08:00:00Z", "interval": 60, "status": "Accepted"});
        station.on_result(boot, Ok(accepted), now);
        assert!(station.booted);
    }

    #[test]
    fn a_walk_in_authorizes_starts_charges_and_leaves_when_full() {
        let mut config = SimConfig::new("ws://x/ocpp", vec![]);
        config.walk_in_every = Some(Duration::from_secs(10));
        config.walk_in_energy_wh = 11_000.0..=11_000.0;
        config.time_scale = 3600.0;
        let mut station = station(config);
        let t0 = Instant::now();
        accept_boot(&mut station, t0);
        assert_eq!(actions(&station), ["StatusNotification"]);
        station.outbox.clear();
        let arrival = station.next_walk_in.expect("a walk-in is scheduled");
        station.advance(arrival, true);
        assert_eq!(actions(&station), ["StatusNotification", "Authorize"]);
        assert_eq!(
            station.outbox[1].payload["idToken"]["idToken"],
            "walkin-cs-1-1"
        );
        let authorize = station.outbox.pop_back().unwrap();
        station.outbox.clear();
        station.on_result(
            authorize,
            Ok(json!({"idTokenInfo": {"status": "Accepted"}})),
            arrival,
        );
        assert_eq!(
            actions(&station),
            ["TransactionEvent", "NotifyEVChargingNeeds"]
        );
        assert_eq!(station.outbox[0].payload["eventType"], "Started");
        assert_eq!(
            station.outbox[1].payload["chargingNeeds"]["acChargingParameters"]["energyAmount"],
            11_000.0
        );
        station.outbox.clear();
        // Half a real second at 22 kW and 3600×: 11 kWh, all it needs.
        station.advance(arrival + Duration::from_millis(500), true);
        assert_eq!(
            actions(&station),
            ["TransactionEvent", "StatusNotification"]
        );
        let ended = &station.outbox[0].payload;
        assert_eq!(ended["eventType"], "Ended");
        assert_eq!(ended["triggerReason"], "EnergyLimitReached");
        assert_eq!(ended["meterValue"][0]["sampledValue"][0]["value"], 11_000.0);
        assert_eq!(station.report.transactions_ended, 1);
        assert!(station.car.is_none() && station.next_walk_in.is_some());
    }

    #[test]
    fn a_limit_applies_from_when_it_is_set() {
        let mut station = station(SimConfig::new("ws://x/ocpp", vec![]));
        let t0 = Instant::now();
        accept_boot(&mut station, t0);
        let reserve = json!({"id": 3, "expiryDateTime": "2027-01-15T09:00:00Z",
            "idToken": {"idToken": "req-1", "type": "Central"}});
        assert_eq!(
            station.answer("ReserveNow", reserve.clone(), t0).unwrap()["status"],
            "Accepted"
        );
        assert_eq!(
            station.answer("ReserveNow", reserve, t0).unwrap()["status"],
            "Occupied"
        );
        let arrival = t0 + station.config.reserved_arrival_delay;
        station.advance(arrival, true);
        let authorize = station.outbox.pop_back().unwrap();
        assert_eq!(authorize.payload["idToken"]["idToken"], "req-1");
        station.on_result(
            authorize,
            Ok(json!({"idTokenInfo": {"status": "Accepted"}})),
            arrival,
        );
        let tx_id = station
            .car
            .as_ref()
            .unwrap()
            .tx
            .as_ref()
            .unwrap()
            .id
            .clone();
        let set = |limit: f64, tx: &str| {
            json!({"evseId": 1, "chargingProfile": {
            "id": 1, "stackLevel": 0, "chargingProfilePurpose": "TxProfile",
            "chargingProfileKind": "Absolute", "transactionId": tx,
            "chargingSchedule": [{"id": 1, "chargingRateUnit": "W",
                "chargingSchedulePeriod": [{"startPeriod": 0, "limit": limit}]}]}})
        };
        assert_eq!(
            station
                .answer("SetChargingProfile", set(7200.0, "other"), arrival)
                .unwrap()["status"],
            "Rejected"
        );
        // One real hour at 22 kW, then one at 7.2 kW (real time: time_scale 1).
        let hour = Duration::from_secs(3600);
        assert_eq!(
            station
                .answer("SetChargingProfile", set(7200.0, &tx_id), arrival + hour)
                .unwrap()["status"],
            "Accepted"
        );
        station.integrate(arrival + 2 * hour);
        let tx = station.car.as_ref().unwrap().tx.as_ref().unwrap();
        assert!((tx.energy_wh - 29_200.0).abs() < 1e-6, "{}", tx.energy_wh);
        assert_eq!(
            station
                .answer(
                    "RequestStopTransaction",
                    json!({"transactionId": "nope"}),
                    arrival + 2 * hour
                )
                .unwrap()["status"],
            "Rejected"
        );
        assert_eq!(
            station
                .answer(
                    "RequestStopTransaction",
                    json!({"transactionId": tx_id}),
                    arrival + 2 * hour
                )
                .unwrap()["status"],
            "Accepted"
        );
        assert!(station.car.is_none());
        assert_eq!(
            station
                .answer("DataTransfer", json!({}), arrival)
                .unwrap_err()
                .0,
            ErrorCode::NotImplemented
        );
        assert_eq!(
            station
                .answer("ReserveNow", json!({"id": "x"}), arrival)
                .unwrap_err()
                .0,
            ErrorCode::FormatViolation
        );
    }
}
