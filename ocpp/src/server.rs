//! The CSMS end of OCPP 2.0.1 over WebSocket: charging stations connect to
//! `ws://HOST:PORT/ocpp/{station_id}` with the subprotocol `ocpp2.0.1` and HTTP Basic
//! authentication (Security Profile 1: the station id and its password from [`Stations`]).
//! Anything else is refused before the upgrade, with the reason in the HTTP answer.
//!
//! On a connection, each CALL from the station is answered in order: BootNotification
//! (accepted, with the heartbeat interval), Heartbeat, StatusNotification, Authorize (every
//! token accepted, until the substation decides), TransactionEvent (Started / Updated / Ended,
//! with the energy register's readings); any other action is answered `NotImplemented`, and a
//! station that has never booted is answered `SecurityError` (OCPP: nothing but a
//! BootNotification until it is accepted). [`Csms::stations`] is what the substation knows of
//! each station: connected or not, its boot details, its connectors and its transactions.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};

use base64::Engine as _;
use chrono::{DateTime, Utc};
use futures::{SinkExt, StreamExt};
use serde::de::DeserializeOwned;
use serde_json::Value;
use warp::Filter;
use warp::http::{HeaderValue, StatusCode, header};
use warp::reply::{Reply, Response};
use warp::ws::{Message, WebSocket, Ws};

use crate::messages::{
    AuthorizationStatus, AuthorizeRequest, AuthorizeResponse, BootNotificationRequest,
    BootNotificationResponse, Checked, HeartbeatRequest, HeartbeatResponse, IdTokenInfo,
    RegistrationStatus, StatusNotificationRequest, StatusNotificationResponse,
    TransactionEventKind, TransactionEventRequest, TransactionEventResponse,
};
use crate::rpc::{ErrorCode, Frame, FrameError};
use crate::stations::Stations;

/// The WebSocket subprotocol of OCPP 2.0.1.
pub const SUBPROTOCOL: &str = "ocpp2.0.1";

/// Largest message a station may send: OCPP messages are small JSON (a few KiB at most).
const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// What the CSMS tells the stations.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Seconds between a station's heartbeats (BootNotification's `interval`).
    pub heartbeat_interval_s: u16,
}

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

/// The CSMS: the stations that may connect and what each has said.
#[derive(Debug)]
pub struct Csms {
    allowed: Stations,
    settings: Settings,
    states: Mutex<HashMap<String, StationState>>,
}

impl Csms {
    pub fn new(allowed: Stations, settings: Settings) -> Arc<Self> {
        Arc::new(Self {
            allowed,
            settings,
            states: Mutex::default(),
        })
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
                to_value(BootNotificationResponse {
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
                to_value(HeartbeatResponse {
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
                to_value(StatusNotificationResponse {})
            }),
            // Which cars are dispatched requests and which walk in is the substation's to
            // decide (issue #12, next); every token is accepted meanwhile.
            "Authorize" => parse::<AuthorizeRequest>(payload).map(|_| {
                to_value(AuthorizeResponse {
                    id_token_info: IdTokenInfo {
                        status: AuthorizationStatus::Accepted,
                    },
                })
            }),
            "TransactionEvent" => parse::<TransactionEventRequest>(payload).map(|event| {
                let id = event.transaction_info.transaction_id.clone();
                self.update(station_id, |s| {
                    s.transactions.entry(id).or_default().apply(&event);
                });
                to_value(TransactionEventResponse {
                    id_token_info: event.id_token.as_ref().map(|_| IdTokenInfo {
                        status: AuthorizationStatus::Accepted,
                    }),
                })
            }),
            other => Err((
                ErrorCode::NotImplemented,
                format!("{other} is not supported by this CSMS"),
            )),
        };
        match result {
            Ok(payload) => Frame::CallResult { id, payload },
            Err((code, description)) => Frame::CallError {
                id,
                code,
                description,
                details: serde_json::json!({}),
            },
        }
    }
}

/// A payload as the message its action names, within its schema's limits.
fn parse<T: DeserializeOwned + Checked>(payload: Value) -> Result<T, (ErrorCode, String)> {
    let message: T =
        serde_json::from_value(payload).map_err(|e| (ErrorCode::FormatViolation, e.to_string()))?;
    message.check()?;
    Ok(message)
}

fn to_value<T: serde::Serialize>(value: T) -> Value {
    serde_json::to_value(value).expect("an OCPP message serializes")
}

/// The HTTP routes of the CSMS: the WebSocket endpoint `/ocpp/{station_id}`.
pub fn routes(
    csms: Arc<Csms>,
) -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone + Send + Sync + 'static {
    warp::path!("ocpp" / String)
        .and(warp::header::optional::<String>("authorization"))
        .and(warp::header::optional::<String>("sec-websocket-protocol"))
        .and(warp::ws())
        .map(
            move |station_id: String,
                  authorization: Option<String>,
                  protocols: Option<String>,
                  ws: Ws| {
                upgrade(csms.clone(), station_id, authorization, protocols, ws)
            },
        )
}

/// Checks a connection attempt and upgrades it, or refuses it with the reason.
fn upgrade(
    csms: Arc<Csms>,
    station_id: String,
    authorization: Option<String>,
    protocols: Option<String>,
    ws: Ws,
) -> Response {
    let offers_ocpp201 = protocols
        .as_deref()
        .is_some_and(|p| p.split(',').any(|p| p.trim() == SUBPROTOCOL));
    if !offers_ocpp201 {
        return refuse(
            StatusCode::BAD_REQUEST,
            format!("this CSMS speaks the WebSocket subprotocol {SUBPROTOCOL} only"),
        );
    }
    if !csms.authenticates(&station_id, authorization.as_deref()) {
        tracing::warn!(station = %station_id, known = csms.allowed.knows(&station_id), "station refused: wrong or missing credentials");
        let mut response = refuse(
            StatusCode::UNAUTHORIZED,
            "unknown station, or wrong password (HTTP Basic: the station id and its password)"
                .to_owned(),
        );
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"evgrid\""),
        );
        return response;
    }
    let reply = ws
        .max_message_size(MAX_MESSAGE_BYTES)
        .on_upgrade(move |socket| serve(csms, station_id, socket));
    let mut response = reply.into_response();
    response.headers_mut().insert(
        header::SEC_WEBSOCKET_PROTOCOL,
        HeaderValue::from_static(SUBPROTOCOL),
    );
    response
}

fn refuse(status: StatusCode, why: String) -> Response {
    warp::reply::with_status(why, status).into_response()
}

/// One station's connection, until it closes.
async fn serve(csms: Arc<Csms>, station_id: String, socket: WebSocket) {
    csms.update(&station_id, |s| s.connected = true);
    tracing::info!(station = %station_id, "station connected");
    let (mut tx, mut rx) = socket.split();
    while let Some(message) = rx.next().await {
        let message = match message {
            Ok(m) => m,
            Err(e) => {
                tracing::info!(station = %station_id, error = %e, "station connection failed");
                break;
            }
        };
        if message.is_close() {
            break;
        }
        let Ok(text) = message.to_str() else {
            // Pings are answered by the WebSocket layer; OCPP-J has no binary messages.
            continue;
        };
        let reply = match Frame::parse(text) {
            Ok(Frame::Call {
                id,
                action,
                payload,
            }) => Some(csms.answer(&station_id, id, &action, payload)),
            // Answers to CALLs of ours: none are sent yet.
            Ok(_) => None,
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
    csms.update(&station_id, |s| s.connected = false);
    tracing::info!(station = %station_id, "station disconnected");
}
