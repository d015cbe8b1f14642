//! The simulated charging stations (`evgrid_ocpp::simulator`) against the real CSMS of
//! `evgrid_ocpp::server` on a real socket, and against a scripted CSMS in this file for what
//! the real one does not send yet (reservations, charging profiles, remote stops).

use std::collections::VecDeque;
use std::time::Duration;

use evgrid_ocpp::rpc::{ErrorCode, Frame};
use evgrid_ocpp::server::{Csms, Settings, serve_stations};
use evgrid_ocpp::simulator::{self, EndReason, Report, SimConfig, SimEvent};
use evgrid_ocpp::stations::Stations;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};
use tokio::task::JoinHandle;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, header};
use tokio_util::sync::CancellationToken;

/// Longest wait for any one thing a test expects.
const WAIT: Duration = Duration::from_secs(10);

/// The next event `pick` takes, skipping others.
async fn next_event<T>(
    events: &mut UnboundedReceiver<SimEvent>,
    mut pick: impl FnMut(SimEvent) -> Option<T>,
) -> T {
    tokio::time::timeout(WAIT, async {
        loop {
            let event = events.recv().await.expect("the simulator is running");
            if let Some(found) = pick(event) {
                return found;
            }
        }
    })
    .await
    .expect("the event comes within 10 s")
}

/// Equal but for JSON's rounding (serde_json reads a float back to within an ulp or so).
fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
}

/// Stops the stations and returns their report.
async fn stop(shutdown: CancellationToken, run: JoinHandle<Report>) -> Report {
    shutdown.cancel();
    tokio::time::timeout(WAIT, run)
        .await
        .expect("the stations stop within 10 s of shutdown")
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn walk_ins_charge_at_the_real_csms_and_a_wrong_password_is_refused() {
    let passwords = [
        "plain-password-0001",
        "plain-password-0002",
        "plain-password-0003",
    ];
    let file: String = (1..=4)
        .map(|i| format!("cs-{i}:plain-password-000{i}\n"))
        .collect();
    let csms = Csms::new(Stations::parse(&file).unwrap(), Settings::default());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/ocpp", listener.local_addr().unwrap());
    let server_stop = CancellationToken::new();
    let _server_stops = server_stop.clone().drop_guard();
    tokio::spawn(serve_stations(csms.clone(), listener, server_stop));

    let mut stations: Vec<(String, String)> = passwords
        .iter()
        .enumerate()
        .map(|(i, p)| (format!("cs-{}", i + 1), (*p).to_owned()))
        .collect();
    stations.push(("cs-4".into(), "not-the-password-04".into()));
    let mut config = SimConfig::new(url, stations);
    config.time_scale = 3600.0;
    config.meter_interval = Duration::from_millis(50);
    config.walk_in_every = Some(Duration::from_millis(100));
    config.seed = 7;
    let (observer, mut events) = unbounded_channel();
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(simulator::run(config, Some(observer), shutdown.clone()));

    let refused = next_event(&mut events, |e| match e {
        SimEvent::Refused { station, status } => Some((station, status)),
        _ => None,
    })
    .await;
    assert_eq!(refused, ("cs-4".to_owned(), 401));

    // The CSMS's state is only observable by asking: poll it, within a bound.
    let known =
        evgrid_test_support::eventually(Duration::from_secs(20), Duration::from_millis(20), || {
            let known = csms.stations();
            let done = (1..=3).all(|i| {
                known.get(&format!("cs-{i}")).is_some_and(|s| {
                    s.transactions.values().any(|tx| {
                        tx.energy_wh > 0.0
                            && tx
                                .id_token
                                .as_deref()
                                .is_some_and(|t| t.starts_with(&format!("walkin-cs-{i}-")))
                    })
                })
            }) && known
                .values()
                .flat_map(|s| s.transactions.values())
                .any(|tx| tx.ended_at.is_some());
            async move { done.then_some(known) }
        })
        .await
        .expect("every station charges walk-ins, and one transaction ends, within 20 s");
    for i in 1..=3 {
        let station = &known[&format!("cs-{i}")];
        assert_eq!(
            station.booted,
            Some(("evgrid".to_owned(), "sim-station".to_owned()))
        );
        assert!(station.connected);
        assert!(station.connectors.contains_key(&(1, 1)), "{station:?}");
        assert!(
            station
                .transactions
                .values()
                .all(|tx| tx.evse == Some(1) && tx.started_at.is_some()),
            "{station:?}"
        );
    }
    assert!(
        !known.contains_key("cs-4"),
        "a refused station is not taken in"
    );

    // What a station says a transaction drew is what the CSMS recorded.
    let (station, transaction_id, energy_wh) = next_event(&mut events, |e| match e {
        SimEvent::Ended {
            station,
            transaction_id,
            energy_wh,
            reason,
        } => {
            assert_ne!(reason, EndReason::RemoteStop, "the CSMS stops no one");
            Some((station, transaction_id, energy_wh))
        }
        _ => None,
    })
    .await;
    assert!(energy_wh > 0.0);
    let recorded = evgrid_test_support::eventually(WAIT, Duration::from_millis(20), || {
        let tx = csms.stations()[&station]
            .transactions
            .get(&transaction_id)
            .cloned();
        async move { tx.filter(|tx| tx.ended_at.is_some()) }
    })
    .await
    .expect("the CSMS records the transaction's end");
    assert!(
        close(recorded.energy_wh, energy_wh),
        "{recorded:?} vs {energy_wh}"
    );

    let report = stop(shutdown, run).await;
    assert_eq!(
        (report.stations, report.connected, report.refused),
        (4, 3, 1),
        "{report:?}"
    );
    assert!(report.transactions_started >= 3, "{report:?}");
    assert!(report.transactions_ended >= 1, "{report:?}");
    assert!(report.energy_wh >= energy_wh && report.frames_sent > 0);
}

/// A CSMS played by the test: it answers the station's CALLs and sends its own.
struct FakeCsms {
    ws: WebSocketStream<TcpStream>,
    next_id: u64,
    /// Station CALLs answered while waiting for something else, oldest first.
    seen: VecDeque<(String, Value)>,
}

impl FakeCsms {
    /// Accepts one station, checking its path, credentials and subprotocol.
    async fn accept(listener: &TcpListener, station: &str, password: &str) -> Self {
        let (tcp, _) = tokio::time::timeout(WAIT, listener.accept())
            .await
            .expect("the station connects within 10 s")
            .unwrap();
        let mut asked = None;
        // The `Result` shape is tungstenite's (`Callback`), not ours to shrink.
        #[allow(clippy::result_large_err)]
        let callback = |request: &Request, mut response: Response| {
            asked = Some((
                request.uri().path().to_owned(),
                request.headers().get(header::AUTHORIZATION).cloned(),
                request
                    .headers()
                    .get(header::SEC_WEBSOCKET_PROTOCOL)
                    .cloned(),
            ));
            response.headers_mut().insert(
                header::SEC_WEBSOCKET_PROTOCOL,
                HeaderValue::from_static("ocpp2.0.1"),
            );
            Ok(response)
        };
        let ws = tokio_tungstenite::accept_hdr_async(tcp, callback)
            .await
            .unwrap();
        use base64::Engine as _;
        let basic =
            base64::engine::general_purpose::STANDARD.encode(format!("{station}:{password}"));
        let (path, authorization, protocol) = asked.unwrap();
        assert_eq!(path, format!("/ocpp/{station}"));
        assert_eq!(authorization.unwrap(), format!("Basic {basic}").as_str());
        assert_eq!(protocol.unwrap(), "ocpp2.0.1");
        Self {
            ws,
            next_id: 0,
            seen: VecDeque::new(),
        }
    }

    async fn recv(&mut self) -> Frame {
        loop {
            let message = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("the station says something within 10 s")
                .expect("the connection is open")
                .unwrap();
            if let Message::Text(text) = message {
                return Frame::parse(text.as_str()).unwrap();
            }
        }
    }

    async fn send(&mut self, frame: Frame) {
        self.ws.send(Message::text(frame.to_text())).await.unwrap();
    }

    /// Answers a station CALL as an accepting CSMS would.
    async fn answer(&mut self, id: String, action: &str) {
        let payload = match action {
            "BootNotification" => {
                json!({"currentTime": "2027-01-15T08:00:00Z", "interval": 300, "status": "Accepted"})
            }
            "Authorize" => json!({"idTokenInfo": {"status": "Accepted"}}),
            "NotifyEVChargingNeeds" => json!({"status": "Accepted"}),
            _ => json!({}),
        };
        self.send(Frame::CallResult { id, payload }).await;
    }

    /// The payload of the station's next CALL of `action`; earlier CALLs are answered and
    /// skipped.
    async fn expect_call(&mut self, action: &str) -> Value {
        while let Some((seen, payload)) = self.seen.pop_front() {
            if seen == action {
                return payload;
            }
        }
        loop {
            match self.recv().await {
                Frame::Call {
                    id,
                    action: seen,
                    payload,
                } => {
                    self.answer(id, &seen).await;
                    if seen == action {
                        return payload;
                    }
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    /// The station's next CALL, whatever it is (answered).
    async fn next_call(&mut self) -> (String, Value) {
        if let Some(seen) = self.seen.pop_front() {
            return seen;
        }
        match self.recv().await {
            Frame::Call {
                id,
                action,
                payload,
            } => {
                self.answer(id, &action).await;
                (action, payload)
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    /// Sends a CALL and returns the station's answer (CALLRESULT or CALLERROR); the station's
    /// own CALLs meanwhile are answered and kept for [`FakeCsms::expect_call`].
    async fn call(&mut self, action: &str, payload: Value) -> Frame {
        self.next_id += 1;
        let id = format!("csms-{}", self.next_id);
        self.send(Frame::Call {
            id: id.clone(),
            action: action.to_owned(),
            payload,
        })
        .await;
        loop {
            match self.recv().await {
                Frame::Call {
                    id: call_id,
                    action,
                    payload,
                } => {
                    self.answer(call_id, &action).await;
                    self.seen.push_back((action, payload));
                }
                answer if answer.id() == id => return answer,
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    async fn status_of(&mut self, action: &str, payload: Value) -> String {
        match self.call(action, payload).await {
            Frame::CallResult { payload, .. } => payload["status"].as_str().unwrap().to_owned(),
            other => panic!("{action} answered {other:?}"),
        }
    }

    /// The next meter report of the transaction: (seqNo, energy Wh, power W).
    async fn meter_report(&mut self, transaction_id: &str) -> (i64, f64, f64) {
        let event = self.expect_call("TransactionEvent").await;
        assert_eq!(event["eventType"], "Updated", "{event}");
        assert_eq!(event["triggerReason"], "MeterValuePeriodic");
        assert_eq!(event["transactionInfo"]["transactionId"], transaction_id);
        let values = &event["meterValue"][0]["sampledValue"];
        let energy = values
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["measurand"] == "Energy.Active.Import.Register")
            .expect("an energy reading");
        let power = values
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["measurand"] == "Power.Active.Import")
            .expect("a power reading");
        assert_eq!(power["unitOfMeasure"]["unit"], "W");
        (
            event["seqNo"].as_i64().unwrap(),
            energy["value"].as_f64().unwrap(),
            power["value"].as_f64().unwrap(),
        )
    }
}

/// A reserved car at a scripted CSMS: it arrives, follows (or ignores) a 7 kW limit, keeps
/// its transaction across a dropped connection, and ends when the CSMS stops it.
async fn reserved_car(ignore_limits: bool) {
    const STATION: &str = "cs-9";
    const PASSWORD: &str = "plain-password-0009";
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut config = SimConfig::new(
        format!("ws://{}/ocpp/", listener.local_addr().unwrap()),
        vec![(STATION.into(), PASSWORD.into())],
    );
    config.time_scale = 3600.0;
    config.meter_interval = Duration::from_millis(50);
    config.reserved_arrival_delay = Duration::from_millis(100);
    config.reconnect_delay = Duration::from_millis(100);
    config.ignore_limits = ignore_limits;
    let (observer, mut events) = unbounded_channel();
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(simulator::run(config, Some(observer), shutdown.clone()));

    let mut csms = FakeCsms::accept(&listener, STATION, PASSWORD).await;
    let boot = csms.expect_call("BootNotification").await;
    assert_eq!(boot["reason"], "PowerUp");
    assert_eq!(boot["chargingStation"]["model"], "sim-station");
    let status = csms.expect_call("StatusNotification").await;
    assert_eq!(
        (
            &status["connectorStatus"],
            &status["evseId"],
            &status["connectorId"]
        ),
        (&json!("Available"), &json!(1), &json!(1))
    );

    let reservation = json!({"id": 7, "expiryDateTime": "2027-01-15T09:00:00Z",
        "idToken": {"idToken": "req-42", "type": "Central"}, "evseId": 1});
    assert_eq!(
        csms.status_of("ReserveNow", reservation.clone()).await,
        "Accepted"
    );
    for expected in ["Reserved", "Occupied"] {
        let status = csms.expect_call("StatusNotification").await;
        assert_eq!(status["connectorStatus"], expected);
    }
    let authorize = csms.expect_call("Authorize").await;
    assert_eq!(authorize["idToken"]["idToken"], "req-42");
    let started = csms.expect_call("TransactionEvent").await;
    assert_eq!(started["eventType"], "Started");
    assert_eq!(started["triggerReason"], "Authorized");
    assert_eq!(started["seqNo"], 0);
    assert_eq!(
        started["idToken"],
        json!({"idToken": "req-42", "type": "Central"})
    );
    assert_eq!(started["evse"], json!({"id": 1, "connectorId": 1}));
    assert_eq!(started["meterValue"][0]["sampledValue"][0]["value"], 0.0);
    let tx = started["transactionInfo"]["transactionId"]
        .as_str()
        .unwrap()
        .to_owned();
    let from_events = next_event(&mut events, |e| match e {
        SimEvent::Started {
            transaction_id,
            id_token,
            ..
        } => Some((transaction_id, id_token)),
        _ => None,
    })
    .await;
    assert_eq!(from_events, (tx.clone(), "req-42".to_owned()));
    assert_eq!(csms.status_of("ReserveNow", reservation).await, "Occupied");
    // Before any limit, the car draws the station's maximum.
    assert_eq!(csms.meter_report(&tx).await.2, 22_000.0);

    let profile = json!({"evseId": 1, "chargingProfile": {
        "id": 1, "stackLevel": 0, "chargingProfilePurpose": "TxProfile",
        "chargingProfileKind": "Absolute", "transactionId": tx,
        "chargingSchedule": [{"id": 1, "chargingRateUnit": "W",
            "chargingSchedulePeriod": [{"startPeriod": 0, "limit": 7000.0}]}]}});
    // Accepted either way: a station ignoring limits lies.
    assert_eq!(
        csms.status_of("SetChargingProfile", profile).await,
        "Accepted"
    );
    let (limited, limit_w) = next_event(&mut events, |e| match e {
        SimEvent::Limit {
            transaction_id,
            limit_w,
            ..
        } => Some((transaction_id, limit_w)),
        _ => None,
    })
    .await;
    assert_eq!((limited.as_str(), limit_w), (tx.as_str(), 7000.0));
    let expected_w = if ignore_limits { 22_000.0 } else { 7_000.0 };
    // Reports read before the answer were sampled before the limit, and one more may be
    // queued at the station: the limit shows in the first or second report after.
    csms.seen.clear();
    let mut report = csms.meter_report(&tx).await;
    if report.2 != expected_w {
        report = csms.meter_report(&tx).await;
    }
    assert_eq!(report.2, expected_w);
    for _ in 0..2 {
        let next = csms.meter_report(&tx).await;
        assert_eq!(next.2, expected_w, "the limit stays in force");
        assert!(
            next.0 > report.0 && next.1 > report.1,
            "{next:?} after {report:?}"
        );
        report = next;
    }
    match csms.call("DataTransfer", json!({"vendorId": "x"})).await {
        Frame::CallError { code, .. } => assert_eq!(code, ErrorCode::NotImplemented),
        other => panic!("DataTransfer answered {other:?}"),
    }

    // The connection drops; the station comes back without booting, its transaction going on.
    drop(csms);
    next_event(&mut events, |e| {
        matches!(e, SimEvent::Disconnected { .. }).then_some(())
    })
    .await;
    let mut csms = FakeCsms::accept(&listener, STATION, PASSWORD).await;
    let (action, event) = csms.next_call().await;
    assert_eq!(action, "TransactionEvent", "no new boot: {event}");
    assert_eq!(event["transactionInfo"]["transactionId"], tx.as_str());
    assert!(event["seqNo"].as_i64().unwrap() > report.0, "{event}");
    let after = csms.meter_report(&tx).await;
    assert_eq!(after.2, expected_w, "the limit outlives the connection");
    assert!(after.1 > report.1);

    let stop_unknown = json!({"transactionId": "not-a-transaction"});
    assert_eq!(
        csms.status_of("RequestStopTransaction", stop_unknown).await,
        "Rejected"
    );
    let stop_it = json!({"transactionId": tx});
    assert_eq!(
        csms.status_of("RequestStopTransaction", stop_it).await,
        "Accepted"
    );
    let ended = loop {
        let event = csms.expect_call("TransactionEvent").await;
        if event["eventType"] == "Ended" {
            break event;
        }
    };
    assert_eq!(ended["triggerReason"], "RemoteStop");
    assert_eq!(ended["transactionInfo"]["stoppedReason"], "Remote");
    let final_wh = ended["meterValue"][0]["sampledValue"][0]["value"]
        .as_f64()
        .unwrap();
    assert!(final_wh >= after.1, "{final_wh} < {}", after.1);
    let status = csms.expect_call("StatusNotification").await;
    assert_eq!(status["connectorStatus"], "Available");
    let (energy_wh, reason) = next_event(&mut events, |e| match e {
        SimEvent::Ended {
            energy_wh, reason, ..
        } => Some((energy_wh, reason)),
        _ => None,
    })
    .await;
    assert_eq!(reason, EndReason::RemoteStop);
    assert!(close(energy_wh, final_wh), "{energy_wh} vs {final_wh}");

    let report = stop(shutdown, run).await;
    assert_eq!(
        (
            report.connections,
            report.transactions_started,
            report.transactions_ended,
            report.profiles_received
        ),
        (2, 1, 1, 1),
        "{report:?}"
    );
    assert!(close(report.energy_wh, final_wh), "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reserved_car_follows_the_csms_limit_until_stopped() {
    reserved_car(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_station_ignoring_limits_accepts_them_and_draws_its_maximum() {
    reserved_car(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stations_without_a_csms_stop_on_shutdown() {
    // A port nothing listens on: the stations retry until shutdown.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/ocpp", listener.local_addr().unwrap());
    drop(listener);
    let mut config = SimConfig::new(url, vec![("cs-1".into(), "plain-password-0001".into())]);
    config.reconnect_delay = Duration::from_millis(20);
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(simulator::run(config, None, shutdown.clone()));
    let report = stop(shutdown, run).await;
    assert_eq!(
        (report.stations, report.connected, report.refused),
        (1, 0, 0)
    );
}
