//! The CSMS end of OCPP 2.0.1 over WebSocket: charging stations connect to
//! `ws://HOST:PORT/ocpp/{station_id}` with the subprotocol `ocpp2.0.1` and HTTP Basic
//! authentication (Security Profile 1: the station id and its password from [`Stations`]).
//! Anything else is refused before the upgrade, with the reason in the HTTP answer (404 for
//! another path, 400 without the subprotocol, 401 with `WWW-Authenticate: Basic`).
//! [`serve_stations`] serves it on a listener, within [`HANDSHAKE_TIMEOUT`] and
//! [`MAX_CONNECTIONS`].
//!
//! On a connection, each CALL from the station is answered in order: BootNotification
//! (accepted, with the heartbeat interval), Heartbeat, StatusNotification, Authorize (every
//! token accepted: which car is which request is the substation's to decide), TransactionEvent,
//! MeterValues, NotifyEVChargingNeeds; any other action is answered `NotImplemented`, and a
//! station that has never booted is answered `SecurityError` (OCPP: nothing but a
//! BootNotification until it is accepted). What the stations do reaches the substation as
//! [`StationEvent`]s ([`Csms::with_events`]); the substation's [`Command`]s go out as CALLs,
//! one outstanding per connection ([`Csms::send`]), each answered as a
//! [`StationEvent::Answered`]. [`Csms::stations`] is what the CSMS knows of each station.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use base64::Engine as _;
use chrono::{DateTime, Utc};
use futures::{SinkExt, StreamExt};
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{
    Callback, ErrorResponse, Request, Response,
};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode, header};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::protocol::frame::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use evgrid_common::http::Acceptor;

use crate::messages::{
    AuthorizationStatus, AuthorizeRequest, AuthorizeResponse, BootNotificationRequest,
    BootNotificationResponse, CancelReservationRequest, ChargingNeeds, ChargingProfile,
    ChargingProfileKind, ChargingProfilePurpose, ChargingRateUnit, ChargingSchedule,
    ChargingSchedulePeriod, Checked, ClearChargingProfileRequest, DEFAULT_PHASES, HeartbeatRequest,
    HeartbeatResponse, IdToken, IdTokenInfo, MeterValuesRequest, MeterValuesResponse,
    NOMINAL_VOLTAGE_V, NotifyEvChargingNeedsRequest, NotifyEvChargingNeedsResponse,
    NotifyEvChargingNeedsStatus, RegistrationStatus, RequestStopTransactionRequest,
    ReserveNowRequest, SetChargingProfileRequest, StatusNotificationRequest,
    StatusNotificationResponse, TransactionEventKind, TransactionEventRequest,
    TransactionEventResponse, newest,
};
use crate::rpc::{self, ErrorCode, Frame, FrameError, Violation, to_payload};
use crate::stations::Stations;

/// The WebSocket subprotocol of OCPP 2.0.1.
pub const SUBPROTOCOL: &str = "ocpp2.0.1";

/// Largest message either side takes: OCPP messages are small JSON (a few KiB at most).
const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// Each connection's WebSocket read buffer. Allocated per connection: tungstenite's defaults
/// (128 KiB each way) cost a substation of 1,000 stations about 60 MB more peak RSS (the OCPP
/// benchmark). OCPP messages are well under 4 KiB; a larger one grows the buffer up to
/// [`MAX_MESSAGE_BYTES`].
const WS_BUFFER_BYTES: usize = 4 * 1024;

/// The WebSocket settings of both ends of an OCPP connection (the CSMS here, the simulated
/// stations): small buffers, OCPP-sized messages. `write_buffer`: bytes gathered before a
/// write (0: every frame at once).
pub(crate) fn ws_config(write_buffer: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(WS_BUFFER_BYTES)
        .write_buffer_size(write_buffer)
        .max_message_size(Some(MAX_MESSAGE_BYTES))
        .max_frame_size(Some(MAX_MESSAGE_BYTES))
}

/// A station must complete its WebSocket handshake within this, or the connection is closed:
/// a real station sends its request in milliseconds (as `evgrid_common::http`'s header timeout).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Station connections open at once (handshakes included); more wait in the listen backlog
/// until one closes. Below the process's file descriptor limit, as the HTTP servers' bound.
pub const MAX_CONNECTIONS: usize = 4096;

/// How long a connection ended by shutdown waits to send its Close frame to the other end.
pub(crate) const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// How long a CALL of the CSMS waits for its answer before it counts as unanswered.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// The id of the TxDefaultProfile the CSMS sets on each station, and of the TxProfile it sets
/// per transaction (one per EVSE: a profile with the same id replaces the last).
pub const DEFAULT_PROFILE_ID: i32 = 1;
pub const TX_PROFILE_ID: i32 = 2;

/// What the CSMS tells the stations.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Seconds between a station's heartbeats (BootNotification's `interval`).
    pub heartbeat_interval_s: u16,
    /// The unit the stations take limits in: W, or A per phase at [`NOMINAL_VOLTAGE_V`] on
    /// [`DEFAULT_PHASES`].
    pub rate_unit: ChargingRateUnit,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            heartbeat_interval_s: 60,
            rate_unit: ChargingRateUnit::W,
        }
    }
}

impl Settings {
    /// A limit in W, in the stations' unit.
    fn limit_in_unit(&self, watts: f64) -> f64 {
        match self.rate_unit {
            ChargingRateUnit::W => watts.floor(),
            // Amperes are rounded down to a tenth: never above the watts asked for.
            ChargingRateUnit::A => {
                (watts / (NOMINAL_VOLTAGE_V * f64::from(DEFAULT_PHASES)) * 10.0).floor() / 10.0
            }
        }
    }
}

/// What a station did, for the substation: sent through the channel of [`Csms::with_events`].
#[derive(Debug, Clone, PartialEq)]
pub enum StationEvent {
    /// Its WebSocket is open (a reconnect, or a new boot: either way its state is as it says
    /// next).
    Connected {
        station: String,
    },
    /// Booted (BootNotification accepted).
    Booted {
        station: String,
    },
    Disconnected {
        station: String,
    },
    /// A TransactionEvent, as sent (it is answered already).
    Transaction {
        station: String,
        event: Box<TransactionEventRequest>,
    },
    /// A MeterValues message: the EVSE's newest energy register (Wh) and power (W) readings.
    Meter {
        station: String,
        evse_id: i32,
        energy_wh: Option<f64>,
        power_w: Option<f64>,
    },
    /// NotifyEVChargingNeeds: what the car on an EVSE asks for.
    Needs {
        station: String,
        evse_id: i32,
        needs: ChargingNeeds,
    },
    /// The answer to a command of the CSMS.
    Answered {
        station: String,
        command: Command,
        outcome: Outcome,
    },
}

/// A CALL of the CSMS to a station ([`Csms::send`]).
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// SetChargingProfile: a TxProfile of `limit_w` for the transaction, or the station's
    /// TxDefaultProfile (the limit of a transaction before it has its own) without one.
    SetLimit {
        evse_id: i32,
        transaction_id: Option<String>,
        limit_w: f64,
    },
    /// ClearChargingProfile of a transaction's TxProfile, once it is over.
    ClearLimit,
    /// RequestStopTransaction.
    Stop { transaction_id: String },
    /// ReserveNow: hold an EVSE for the car with `id_token` until `expiry`.
    Reserve {
        reservation_id: i32,
        id_token: String,
        evse_id: Option<i32>,
        expiry: DateTime<Utc>,
    },
    /// CancelReservation.
    CancelReservation { reservation_id: i32 },
}

impl Command {
    /// The CALL's action and payload, with limits in the stations' unit.
    fn call(&self, settings: &Settings) -> (&'static str, Value) {
        match self {
            Command::SetLimit {
                evse_id,
                transaction_id,
                limit_w,
            } => {
                let (id, purpose) = match transaction_id {
                    Some(_) => (TX_PROFILE_ID, ChargingProfilePurpose::TxProfile),
                    None => (DEFAULT_PROFILE_ID, ChargingProfilePurpose::TxDefaultProfile),
                };
                let request = SetChargingProfileRequest {
                    evse_id: *evse_id,
                    charging_profile: ChargingProfile {
                        id,
                        stack_level: 0,
                        charging_profile_purpose: purpose,
                        charging_profile_kind: ChargingProfileKind::Relative,
                        transaction_id: transaction_id.clone(),
                        charging_schedule: vec![ChargingSchedule {
                            id,
                            charging_rate_unit: settings.rate_unit,
                            charging_schedule_period: vec![ChargingSchedulePeriod {
                                start_period: 0,
                                limit: settings.limit_in_unit(*limit_w),
                                number_phases: (settings.rate_unit == ChargingRateUnit::A)
                                    .then_some(DEFAULT_PHASES),
                            }],
                        }],
                    },
                };
                ("SetChargingProfile", to_payload(request))
            }
            Command::ClearLimit => (
                "ClearChargingProfile",
                to_payload(ClearChargingProfileRequest {
                    charging_profile_id: Some(TX_PROFILE_ID),
                }),
            ),
            Command::Stop { transaction_id } => (
                "RequestStopTransaction",
                to_payload(RequestStopTransactionRequest {
                    transaction_id: transaction_id.clone(),
                }),
            ),
            Command::Reserve {
                reservation_id,
                id_token,
                evse_id,
                expiry,
            } => (
                "ReserveNow",
                to_payload(ReserveNowRequest {
                    id: *reservation_id,
                    expiry_date_time: *expiry,
                    id_token: IdToken {
                        id_token: id_token.clone(),
                        kind: "Central".into(),
                    },
                    evse_id: *evse_id,
                }),
            ),
            Command::CancelReservation { reservation_id } => (
                "CancelReservation",
                to_payload(CancelReservationRequest {
                    reservation_id: *reservation_id,
                }),
            ),
        }
    }

    /// Whether `next` makes this command, still queued, pointless: a newer limit for the same
    /// transaction (only the newest limit matters).
    fn replaced_by(&self, next: &Command) -> bool {
        matches!(
            (self, next),
            (
                Command::SetLimit { evse_id: a, transaction_id: ta, .. },
                Command::SetLimit { evse_id: b, transaction_id: tb, .. },
            ) if a == b && ta == tb
        )
    }
}

/// How a station answered a command.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Accepted,
    /// Answered, but not `Accepted` (its status, or the CALLERROR's code).
    Refused(String),
    /// No answer within [`CALL_TIMEOUT`].
    TimedOut,
    /// The connection closed first.
    Unreachable,
}

/// Ended transactions kept per station, newest first: a station ends one every car, and a
/// substation runs for months.
const ENDED_KEPT: usize = 8;

/// What the substation knows of one station.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StationState {
    pub connected: bool,
    /// From its BootNotification: vendor and model; `None` until it has booted.
    pub booted: Option<(String, String)>,
    pub last_heard: Option<DateTime<Utc>>,
    /// Each connector's status, by (EVSE id, connector id).
    pub connectors: BTreeMap<(i32, i32), String>,
    /// Its transactions, by transaction id.
    pub transactions: BTreeMap<String, Transaction>,
}

impl StationState {
    /// Takes in one event of transaction `id`, keeping at most [`ENDED_KEPT`] ended ones.
    fn record(&mut self, id: String, event: &TransactionEventRequest) {
        self.transactions.entry(id).or_default().apply(event);
        let mut ended: Vec<(DateTime<Utc>, String)> = self
            .transactions
            .iter()
            .filter_map(|(id, t)| Some((t.ended_at?, id.clone())))
            .collect();
        if ended.len() > ENDED_KEPT {
            ended.sort();
            for (_, id) in &ended[..ended.len() - ENDED_KEPT] {
                self.transactions.remove(id);
            }
        }
    }
}

/// One charging transaction as the station reports it (TransactionEvent).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Transaction {
    /// Who charges: the idToken the transaction was started or authorized with.
    pub id_token: Option<String>,
    pub evse: Option<i32>,
    pub started_at: Option<DateTime<Utc>>,
    /// The energy register's last reading since the start, in Wh: the truth for energy.
    pub energy_wh: f64,
    pub ended_at: Option<DateTime<Utc>>,
    pub stopped_reason: Option<String>,
    /// The last `seqNo` taken: an older event (a resend) changes nothing.
    pub seq_no: i32,
}

impl Transaction {
    /// Takes in one event of this transaction, unless it is older than the last taken.
    fn apply(&mut self, event: &TransactionEventRequest) {
        if event.seq_no < self.seq_no && self.started_at.is_some() {
            return;
        }
        self.seq_no = event.seq_no;
        if let Some(token) = &event.id_token {
            self.id_token = Some(token.id_token.clone());
        }
        if let Some(evse) = &event.evse {
            self.evse = Some(evse.id);
        }
        if let Some(wh) = event.energy_wh() {
            self.energy_wh = wh;
        }
        match event.event_type {
            TransactionEventKind::Started => self.started_at = Some(event.timestamp),
            TransactionEventKind::Updated => {
                self.started_at.get_or_insert(event.timestamp);
            }
            TransactionEventKind::Ended => {
                self.started_at.get_or_insert(event.timestamp);
                self.ended_at = Some(event.timestamp);
                self.stopped_reason = event.transaction_info.stopped_reason.clone();
            }
        }
    }
}

/// The CSMS: the stations that may connect, what each has said, and the way to each open
/// connection.
#[derive(Debug)]
pub struct Csms {
    allowed: Stations,
    settings: Settings,
    states: Mutex<HashMap<String, StationState>>,
    events: Option<mpsc::UnboundedSender<StationEvent>>,
    /// Each connected station's command queue, with the number of its connection (a station
    /// that reconnects replaces its last connection).
    outboxes: Mutex<HashMap<String, (u64, mpsc::UnboundedSender<Command>)>>,
    connections: AtomicU64,
}

impl Csms {
    pub fn new(allowed: Stations, settings: Settings) -> Arc<Self> {
        Arc::new(Self::build(allowed, settings, None))
    }

    /// A CSMS that reports what the stations do on the returned channel.
    pub fn with_events(
        allowed: Stations,
        settings: Settings,
    ) -> (Arc<Self>, mpsc::UnboundedReceiver<StationEvent>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Arc::new(Self::build(allowed, settings, Some(tx))), rx)
    }

    fn build(
        allowed: Stations,
        settings: Settings,
        events: Option<mpsc::UnboundedSender<StationEvent>>,
    ) -> Self {
        Self {
            allowed,
            settings,
            states: Mutex::default(),
            events,
            outboxes: Mutex::default(),
            connections: AtomicU64::new(0),
        }
    }

    /// Queues `command` for `station`: sent when its CALL before is answered (one outstanding
    /// CALL per direction), answered as [`StationEvent::Answered`]. False when the station is
    /// not connected.
    pub fn send(&self, station: &str, command: Command) -> bool {
        let outboxes = self.outboxes.lock().unwrap_or_else(PoisonError::into_inner);
        outboxes
            .get(station)
            .is_some_and(|(_, tx)| tx.send(command).is_ok())
    }

    fn report(&self, event: StationEvent) {
        if let Some(events) = &self.events {
            // The substation is gone (shutting down): nobody to tell.
            let _ = events.send(event);
        }
    }

    /// Every station that has connected, by id.
    pub fn stations(&self) -> BTreeMap<String, StationState> {
        self.lock()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, StationState>> {
        self.states.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn update(&self, station_id: &str, change: impl FnOnce(&mut StationState)) {
        let mut states = self.lock();
        let state = states.entry(station_id.to_owned()).or_default();
        state.last_heard = Some(Utc::now());
        change(state);
    }

    /// Whether `authorization` (a header value) is `Basic` with `station_id` and its password.
    fn authenticates(&self, station_id: &str, authorization: Option<&str>) -> bool {
        let Some(encoded) = authorization.and_then(|v| {
            let (scheme, rest) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("basic").then_some(rest.trim())
        }) else {
            return false;
        };
        let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded) else {
            return false;
        };
        let Ok(decoded) = String::from_utf8(decoded) else {
            return false;
        };
        match decoded.split_once(':') {
            Some((user, password)) => {
                user == station_id && self.allowed.verify(station_id, password)
            }
            None => false,
        }
    }

    /// The answer to one CALL of `station_id`.
    fn answer(&self, station_id: &str, id: String, action: &str, payload: Value) -> Frame {
        let booted = self
            .lock()
            .get(station_id)
            .is_some_and(|s| s.booted.is_some());
        let result = match action {
            "BootNotification" => parse::<BootNotificationRequest>(payload).map(|boot| {
                let station = boot.charging_station;
                self.update(station_id, |s| {
                    s.booted = Some((station.vendor_name, station.model));
                });
                tracing::info!(station = station_id, reason = ?boot.reason, "station booted");
                self.report(StationEvent::Booted {
                    station: station_id.to_owned(),
                });
                to_payload(BootNotificationResponse {
                    current_time: Utc::now(),
                    interval: i32::from(self.settings.heartbeat_interval_s),
                    status: RegistrationStatus::Accepted,
                })
            }),
            _ if !booted => Err((
                ErrorCode::SecurityError,
                "the station has not been accepted: send BootNotification first".to_owned(),
            )),
            "Heartbeat" => parse::<HeartbeatRequest>(payload).map(|_| {
                self.update(station_id, |_| {});
                to_payload(HeartbeatResponse {
                    current_time: Utc::now(),
                })
            }),
            "StatusNotification" => parse::<StatusNotificationRequest>(payload).map(|status| {
                self.update(station_id, |s| {
                    s.connectors.insert(
                        (status.evse_id, status.connector_id),
                        format!("{:?}", status.connector_status),
                    );
                });
                to_payload(StatusNotificationResponse {})
            }),
            // Which cars are dispatched requests and which walk in is the substation's to
            // decide (issue #12, next); every token is accepted meanwhile.
            "Authorize" => parse::<AuthorizeRequest>(payload).map(|_| {
                to_payload(AuthorizeResponse {
                    id_token_info: IdTokenInfo {
                        status: AuthorizationStatus::Accepted,
                    },
                })
            }),
            "TransactionEvent" => parse::<TransactionEventRequest>(payload).map(|event| {
                let id = event.transaction_info.transaction_id.clone();
                self.update(station_id, |s| s.record(id, &event));
                let answer = to_payload(TransactionEventResponse {
                    id_token_info: event.id_token.as_ref().map(|_| IdTokenInfo {
                        status: AuthorizationStatus::Accepted,
                    }),
                });
                self.report(StationEvent::Transaction {
                    station: station_id.to_owned(),
                    event: Box::new(event),
                });
                answer
            }),
            "MeterValues" => parse::<MeterValuesRequest>(payload).map(|meter| {
                self.update(station_id, |_| {});
                self.report(StationEvent::Meter {
                    station: station_id.to_owned(),
                    evse_id: meter.evse_id,
                    energy_wh: newest(&meter.meter_value, |v| v.energy_wh()),
                    power_w: newest(&meter.meter_value, |v| v.power_w()),
                });
                to_payload(MeterValuesResponse {})
            }),
            "NotifyEVChargingNeeds" => {
                parse::<NotifyEvChargingNeedsRequest>(payload).map(|notify| {
                    self.update(station_id, |_| {});
                    self.report(StationEvent::Needs {
                        station: station_id.to_owned(),
                        evse_id: notify.evse_id,
                        needs: notify.charging_needs,
                    });
                    to_payload(NotifyEvChargingNeedsResponse {
                        status: NotifyEvChargingNeedsStatus::Accepted,
                    })
                })
            }
            other => Err((
                ErrorCode::NotImplemented,
                format!("{other} is not supported by this CSMS"),
            )),
        };
        Frame::reply(id, result)
    }
}

/// A payload as the message its action names, within its schema's limits.
fn parse<T: DeserializeOwned + Checked>(payload: Value) -> Result<T, Violation> {
    let message: T = rpc::payload(payload)?;
    message.check()?;
    Ok(message)
}

/// Serves the CSMS on `listener` until `shutdown`: each connection is a station's WebSocket
/// upgrade to `/ocpp/{station_id}`, checked as the module says and then served until it closes.
/// On `shutdown` it stops accepting, closes every station's connection (Close 1001, going away)
/// and returns once all of them have ended.
///
/// Served with tokio-tungstenite directly rather than through the HTTP server: warp builds each
/// WebSocket with tungstenite's default buffers, 256 KiB per connection, and cannot be told
/// otherwise. A request that is not a WebSocket upgrade at all is closed without an answer.
pub async fn serve_stations(csms: Arc<Csms>, listener: TcpListener, shutdown: CancellationToken) {
    let acceptor = Acceptor::new(MAX_CONNECTIONS);
    let connections = TaskTracker::new();
    while let Some((stream, slot)) = acceptor.accept(&listener, &shutdown).await {
        let csms = csms.clone();
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            connection(csms, stream, shutdown).await;
            drop(slot);
        });
    }
    connections.close();
    connections.wait().await;
}

/// One accepted TCP connection: the handshake within [`HANDSHAKE_TIMEOUT`], then the station.
async fn connection(csms: Arc<Csms>, stream: TcpStream, shutdown: CancellationToken) {
    let config = ws_config(WS_BUFFER_BYTES);
    let mut admitted = None;
    let callback = Admission {
        csms: &csms,
        admitted: &mut admitted,
    };
    let handshake = tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(config));
    let socket = tokio::select! {
        done = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake) => match done {
            Ok(Ok(socket)) => socket,
            // Refused (the answer is sent), or not a WebSocket request.
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "station connection not upgraded");
                return;
            }
            Err(_) => {
                tracing::debug!("no WebSocket handshake within {HANDSHAKE_TIMEOUT:?}");
                return;
            }
        },
        _ = shutdown.cancelled() => return,
    };
    let Some(station_id) = admitted else {
        // The handshake succeeds only through the callback's `Ok`, which names the station.
        return;
    };
    serve(csms, station_id, socket, shutdown).await;
}

/// The handshake's check of a station ([`admit`]), keeping the id of the station let in.
struct Admission<'a> {
    csms: &'a Csms,
    admitted: &'a mut Option<String>,
}

impl Callback for Admission<'_> {
    fn on_request(
        self,
        request: &Request,
        mut response: Response,
    ) -> Result<Response, ErrorResponse> {
        let station_id = admit(self.csms, request).map_err(Refusal::response)?;
        response.headers_mut().insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(SUBPROTOCOL),
        );
        *self.admitted = Some(station_id);
        Ok(response)
    }
}

/// Why a station's upgrade request is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// Not `/ocpp/{station_id}`.
    NotFound,
    /// Does not offer the subprotocol `ocpp2.0.1`.
    NoSubprotocol,
    /// Unknown station, or not its credentials.
    Unauthorized,
}

impl Refusal {
    /// The HTTP answer, with the reason as a text body. tungstenite writes the headers as
    /// given: the length tells the client where the body ends, and the connection closes after.
    fn response(self) -> ErrorResponse {
        let (status, why) = match self {
            Refusal::NotFound => (
                StatusCode::NOT_FOUND,
                "stations connect to /ocpp/{station id}".to_owned(),
            ),
            Refusal::NoSubprotocol => (
                StatusCode::BAD_REQUEST,
                format!("this CSMS speaks the WebSocket subprotocol {SUBPROTOCOL} only"),
            ),
            Refusal::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                "unknown station, or wrong password (HTTP Basic: the station id and its password)"
                    .to_owned(),
            ),
        };
        let length = why.len();
        let mut response = ErrorResponse::new(Some(why));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        if self == Refusal::Unauthorized {
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"evgrid\""),
            );
        }
        response
    }
}

/// Checks a station's upgrade request, in warp's order before: the path, the subprotocol, the
/// credentials. The station's id, or why it is refused.
fn admit(csms: &Csms, request: &Request) -> Result<String, Refusal> {
    // No percent-decoding: a station id has no '%' (`check_station_id`), so an encoded path
    // names no known station and is refused below like any unknown one.
    let station_id = request
        .uri()
        .path()
        .strip_prefix("/ocpp/")
        .filter(|id| !id.is_empty() && !id.contains('/'))
        .ok_or(Refusal::NotFound)?;
    let offers_ocpp201 = request
        .headers()
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim() == SUBPROTOCOL);
    if !offers_ocpp201 {
        return Err(Refusal::NoSubprotocol);
    }
    let authorization = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if !csms.authenticates(station_id, authorization) {
        tracing::warn!(station = %station_id, known = csms.allowed.knows(station_id), "station refused: wrong or missing credentials");
        return Err(Refusal::Unauthorized);
    }
    Ok(station_id.to_owned())
}

/// One station's connection, until it closes: answers its CALLs in order, and sends the
/// substation's commands one CALL at a time.
async fn serve(
    csms: Arc<Csms>,
    station_id: String,
    socket: WebSocketStream<TcpStream>,
    shutdown: CancellationToken,
) {
    let connection = csms.connections.fetch_add(1, Ordering::Relaxed);
    let (commands_tx, mut commands) = mpsc::unbounded_channel();
    csms.outboxes
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(station_id.clone(), (connection, commands_tx));
    csms.update(&station_id, |s| s.connected = true);
    csms.report(StationEvent::Connected {
        station: station_id.clone(),
    });
    tracing::info!(station = %station_id, "station connected");
    let (mut tx, mut rx) = socket.split();
    let mut calls = Calls::default();
    loop {
        if let Some(text) = calls.next_call(&csms.settings) {
            if tx.send(Message::text(text)).await.is_err() {
                break;
            }
            continue;
        }
        let deadline = calls.deadline();
        let message = tokio::select! {
            message = rx.next() => message,
            Some(command) = commands.recv() => {
                calls.queue(command);
                continue;
            }
            _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                if let Some(command) = calls.timed_out() {
                    tracing::warn!(station = %station_id, ?command, "no answer within {CALL_TIMEOUT:?}");
                    csms.report(StationEvent::Answered { station: station_id.clone(), command, outcome: Outcome::TimedOut });
                }
                continue;
            }
            _ = shutdown.cancelled() => {
                // Best effort: the station learns the CSMS is going away, and reconnects.
                let away = Message::Close(Some(CloseFrame {
                    code: CloseCode::Away,
                    reason: "the CSMS is shutting down".into(),
                }));
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, tx.send(away)).await;
                break;
            }
        };
        let message = match message {
            Some(Ok(m)) => m,
            Some(Err(e)) => {
                tracing::info!(station = %station_id, error = %e, "station connection failed");
                break;
            }
            None => break,
        };
        let text = match &message {
            Message::Text(text) => text.as_str(),
            Message::Close(_) => break,
            // Pings are answered by the WebSocket layer; OCPP-J has no binary messages.
            _ => continue,
        };
        let reply = match Frame::parse(text) {
            Ok(Frame::Call {
                id,
                action,
                payload,
            }) => Some(csms.answer(&station_id, id, &action, payload)),
            Ok(answer) => {
                if let Some((command, outcome)) = calls.answered(answer) {
                    csms.report(StationEvent::Answered {
                        station: station_id.clone(),
                        command,
                        outcome,
                    });
                }
                None
            }
            Err(e) => {
                tracing::warn!(station = %station_id, error = %e, "a message that is not OCPP-J");
                FrameError::answer(&e)
            }
        };
        if let Some(reply) = reply
            && tx.send(Message::text(reply.to_text())).await.is_err()
        {
            break;
        }
    }
    for command in calls.abandon() {
        csms.report(StationEvent::Answered {
            station: station_id.clone(),
            command,
            outcome: Outcome::Unreachable,
        });
    }
    // A station that reconnected before this connection noticed it was gone is connected:
    // only the current connection's end is the station's.
    let current = {
        let mut outboxes = csms.outboxes.lock().unwrap_or_else(PoisonError::into_inner);
        let current = outboxes
            .get(&station_id)
            .is_some_and(|(c, _)| *c == connection);
        if current {
            outboxes.remove(&station_id);
        }
        current
    };
    if current {
        csms.update(&station_id, |s| s.connected = false);
        csms.report(StationEvent::Disconnected {
            station: station_id.clone(),
        });
    }
    tracing::info!(station = %station_id, "station disconnected");
}

/// The CSMS's CALLs on one connection: queued, and the one outstanding.
#[derive(Debug, Default)]
struct Calls {
    queued: VecDeque<Command>,
    /// The CALL sent and not answered yet: its message id, command and deadline.
    outstanding: Option<(String, Command, Instant)>,
    sent: u64,
}

impl Calls {
    fn queue(&mut self, command: Command) {
        match self.queued.iter_mut().find(|q| q.replaced_by(&command)) {
            Some(queued) => *queued = command,
            None => self.queued.push_back(command),
        }
    }

    /// The text of the next CALL to send, when none is outstanding.
    fn next_call(&mut self, settings: &Settings) -> Option<String> {
        if self.outstanding.is_some() {
            return None;
        }
        let command = self.queued.pop_front()?;
        self.sent += 1;
        let id = format!("csms-{}", self.sent);
        let (action, payload) = command.call(settings);
        let text = Frame::Call {
            id: id.clone(),
            action: action.to_owned(),
            payload,
        }
        .to_text();
        self.outstanding = Some((id, command, Instant::now() + CALL_TIMEOUT));
        Some(text)
    }

    fn deadline(&self) -> Option<Instant> {
        self.outstanding.as_ref().map(|(_, _, at)| *at)
    }

    fn timed_out(&mut self) -> Option<Command> {
        self.outstanding.take().map(|(_, command, _)| command)
    }

    /// The outstanding command and how it went, when `answer` is its answer.
    fn answered(&mut self, answer: Frame) -> Option<(Command, Outcome)> {
        if self.outstanding.as_ref()?.0 != answer.id() {
            // A late answer to a CALL that timed out: it was reported already.
            return None;
        }
        let (_, command, _) = self.outstanding.take()?;
        let outcome = match answer {
            Frame::CallResult { payload, .. } => {
                match payload.get("status").and_then(Value::as_str) {
                    Some("Accepted") => Outcome::Accepted,
                    Some(other) => Outcome::Refused(other.to_owned()),
                    None => Outcome::Refused("no status".to_owned()),
                }
            }
            Frame::CallError { code, .. } => Outcome::Refused(code.as_str().to_owned()),
            Frame::Call { .. } => unreachable!("CALLs are answered, not matched"),
        };
        Some((command, outcome))
    }

    /// Everything not answered, once the connection is gone.
    fn abandon(&mut self) -> impl Iterator<Item = Command> + '_ {
        self.outstanding
            .take()
            .map(|(_, command, _)| command)
            .into_iter()
            .chain(self.queued.drain(..))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upgrade_request(path: &str, protocol: Option<&str>, user_password: &str) -> Request {
        let mut request = Request::builder().uri(path);
        if let Some(protocol) = protocol {
            request = request.header(header::SEC_WEBSOCKET_PROTOCOL, protocol);
        }
        let basic = base64::engine::general_purpose::STANDARD.encode(user_password);
        request
            .header(header::AUTHORIZATION, format!("Basic {basic}"))
            .body(())
            .unwrap()
    }

    #[test]
    fn a_station_is_admitted_on_its_path_with_the_subprotocol_and_its_password() {
        let csms = Csms::new(
            Stations::parse("cs-1:plain-password-0123\ncs-2:plain-password-0456\n").unwrap(),
            Settings::default(),
        );
        let admitted = |path, protocol, credentials| {
            admit(&csms, &upgrade_request(path, protocol, credentials))
        };
        let ok = "cs-1:plain-password-0123";
        assert_eq!(
            admitted("/ocpp/cs-1", Some("ocpp1.6, ocpp2.0.1"), ok),
            Ok("cs-1".to_owned())
        );
        for path in ["/ocpp", "/ocpp/", "/other/cs-1", "/ocpp/cs-1/more"] {
            assert_eq!(
                admitted(path, Some(SUBPROTOCOL), ok),
                Err(Refusal::NotFound),
                "{path}"
            );
        }
        assert_eq!(
            admitted("/ocpp/cs-1", None, ok),
            Err(Refusal::NoSubprotocol)
        );
        assert_eq!(
            admitted("/ocpp/cs-1", Some("ocpp1.6"), ok),
            Err(Refusal::NoSubprotocol)
        );
        for (path, credentials) in [
            ("/ocpp/cs-1", "cs-1:plain-password-0124"),
            // Another station's id and password, on this station's path.
            ("/ocpp/cs-1", "cs-2:plain-password-0456"),
            ("/ocpp/cs-9", "cs-9:plain-password-0123"),
            ("/ocpp/cs%2D1", "cs%2D1:plain-password-0123"),
        ] {
            assert_eq!(
                admitted(path, Some(SUBPROTOCOL), credentials),
                Err(Refusal::Unauthorized),
                "{path} {credentials}"
            );
        }
    }

    #[test]
    fn refusals_say_why_and_only_401_asks_for_basic_credentials() {
        for (refusal, status) in [
            (Refusal::NotFound, 404),
            (Refusal::NoSubprotocol, 400),
            (Refusal::Unauthorized, 401),
        ] {
            let response = refusal.response();
            assert_eq!(response.status(), status);
            let body = response.body().clone().unwrap();
            assert!(!body.is_empty());
            assert_eq!(
                response.headers()[header::CONTENT_LENGTH],
                body.len().to_string()
            );
            let challenge = response.headers().get(header::WWW_AUTHENTICATE);
            assert_eq!(
                challenge.is_some_and(|c| c == "Basic realm=\"evgrid\""),
                status == 401
            );
        }
    }

    fn limit(transaction: &str, limit_w: f64) -> Command {
        Command::SetLimit {
            evse_id: 1,
            transaction_id: Some(transaction.to_owned()),
            limit_w,
        }
    }

    #[test]
    fn one_call_at_a_time_and_only_the_newest_limit_of_a_transaction_is_sent() {
        let settings = Settings::default();
        let mut calls = Calls::default();
        calls.queue(limit("t1", 7000.0));
        let first = calls.next_call(&settings).unwrap();
        assert!(first.contains("SetChargingProfile") && first.contains("7000"));
        calls.queue(limit("t1", 5000.0));
        calls.queue(limit("t2", 3000.0));
        calls.queue(limit("t1", 4000.0));
        assert_eq!(calls.next_call(&settings), None, "one outstanding CALL");
        // Someone else's answer (a late one) changes nothing.
        let stray = Frame::CallResult {
            id: "csms-9".into(),
            payload: serde_json::json!({"status": "Accepted"}),
        };
        assert_eq!(calls.answered(stray), None);
        let answer = Frame::CallResult {
            id: "csms-1".into(),
            payload: serde_json::json!({"status": "Rejected"}),
        };
        assert_eq!(
            calls.answered(answer),
            Some((limit("t1", 7000.0), Outcome::Refused("Rejected".into())))
        );
        let second = calls.next_call(&settings).unwrap();
        assert!(second.contains("4000"), "{second}");
        assert_eq!(calls.timed_out(), Some(limit("t1", 4000.0)));
        assert!(calls.next_call(&settings).unwrap().contains("3000"));
        assert_eq!(calls.abandon().collect::<Vec<_>>(), [limit("t2", 3000.0)]);
    }

    #[test]
    fn a_station_keeps_its_last_ended_transactions_only() {
        let mut state = StationState::default();
        let event = |kind: &str, minute: u32| -> TransactionEventRequest {
            serde_json::from_value(serde_json::json!({
                "eventType": kind, "timestamp": format!("2027-01-15T08:{minute:02}:00Z"),
                "triggerReason": "EVDeparted", "seqNo": 0,
                "transactionInfo": {"transactionId": "t"}
            }))
            .unwrap()
        };
        state.record("going".into(), &event("Started", 0));
        for n in 0..20 {
            state.record(format!("t{n:02}"), &event("Ended", n + 1));
        }
        let kept: Vec<&str> = state.transactions.keys().map(String::as_str).collect();
        assert_eq!(kept.len(), ENDED_KEPT + 1, "{kept:?}");
        assert!(kept.contains(&"going") && kept.contains(&"t19") && !kept.contains(&"t11"));
    }

    #[test]
    fn limits_go_out_in_the_stations_unit_never_above_the_watts() {
        let amps = Settings {
            rate_unit: ChargingRateUnit::A,
            ..Settings::default()
        };
        // 11 kW on three phases at 230 V: 15.94 A, sent as 15.9.
        assert_eq!(amps.limit_in_unit(11_000.0), 15.9);
        assert_eq!(Settings::default().limit_in_unit(7_000.4), 7000.0);
        let (action, payload) = limit("t1", 11_000.0).call(&amps);
        assert_eq!(action, "SetChargingProfile");
        assert_eq!(
            payload["chargingProfile"]["chargingSchedule"][0],
            serde_json::json!({"id": TX_PROFILE_ID, "chargingRateUnit": "A",
                "chargingSchedulePeriod": [{"startPeriod": 0, "limit": 15.9, "numberPhases": 3}]})
        );
        assert_eq!(
            payload["chargingProfile"]["chargingProfilePurpose"],
            "TxProfile"
        );
    }
}
