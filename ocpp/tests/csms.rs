//! The CSMS endpoint driven by a real OCPP 2.0.1 client no one here wrote: the Python `ocpp`
//! package over `websockets` (`station.py`), against the real server on a real socket.

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use evgrid_ocpp::server::{Csms, Settings, serve_stations};
use evgrid_ocpp::stations::Stations;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

/// A running CSMS, stopped when dropped.
struct Running {
    url: String,
    csms: Arc<Csms>,
    stop: CancellationToken,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn start(stations: &str) -> Running {
    let csms = Csms::new(
        Stations::parse(stations).unwrap(),
        Settings {
            heartbeat_interval_s: 60,
            ..Settings::default()
        },
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    tokio::spawn(serve_stations(csms.clone(), listener, stop.clone()));
    Running { url, csms, stop }
}

/// Runs `station.py` and returns the JSON objects it printed.
async fn station(url: &str, id: &str, password: &str, scenario: &str) -> Vec<Value> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/station.py");
    let args = [script, url, id, password, scenario].map(str::to_owned);
    let run = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::task::spawn_blocking(move || {
            Command::new(evgrid_test_support::python())
                .args(args)
                .output()
        }),
    )
    .await
    .expect("the station finishes within 30 s")
    .unwrap()
    .expect("python3 runs (scripts/install-test-deps installs ocpp and websockets)");
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "station.py {scenario} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

fn hashed_stations() -> String {
    use argon2::password_hash::{PasswordHasher, SaltString, rand_core::OsRng};
    let salt = SaltString::generate(&mut OsRng);
    let argon = argon2::Argon2::default()
        .hash_password(b"argon-password-0123", &salt)
        .unwrap()
        .to_string();
    let bcrypt = bcrypt::hash("bcrypt-password-0123", 4).unwrap();
    format!("cs-1:plain-password-0123\ncs-2:{argon}\ncs-3:{bcrypt}\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_station_boots_heartbeats_and_reports_its_connectors() {
    let csms = start(&hashed_stations()).await;
    let steps = station(&csms.url, "cs-1", "plain-password-0123", "boot").await;
    assert_eq!(steps[0]["subprotocol"], "ocpp2.0.1", "{steps:?}");
    assert_eq!(steps[1]["boot"], "Accepted");
    assert_eq!(steps[1]["interval"], 60);
    assert!(steps[2]["heartbeat"].as_str().unwrap().contains('T'));
    assert_eq!(steps[3]["status"], "sent");
    assert_eq!(steps[4]["data_transfer_error"], "NotImplementedError");

    let known = csms.csms.stations();
    let cs1 = &known["cs-1"];
    assert_eq!(
        cs1.booted,
        Some(("evgrid-test".to_owned(), "Wallbox 22".to_owned()))
    );
    assert_eq!(cs1.connectors[&(1, 1)], "Available");
    // The connection's end is seen (bounded wait: the server notices the close).
    evgrid_test_support::eventually(Duration::from_secs(5), Duration::from_millis(20), || {
        let connected = csms.csms.stations()["cs-1"].connected;
        async move { (!connected).then_some(()) }
    })
    .await
    .expect("the station's disconnection is seen");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hashed_passwords_let_their_stations_in() {
    let csms = start(&hashed_stations()).await;
    for (id, password) in [
        ("cs-2", "argon-password-0123"),
        ("cs-3", "bcrypt-password-0123"),
    ] {
        let steps = station(&csms.url, id, password, "connect").await;
        assert_eq!(steps[0]["connected"], true, "{id}: {steps:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_unknown_stations_and_other_protocols_are_refused() {
    let csms = start(&hashed_stations()).await;
    for (id, password, scenario, status) in [
        ("cs-1", "plain-password-0124", "connect", 401),
        ("cs-2", "plain-password-0123", "connect", 401),
        ("cs-9", "plain-password-0123", "connect", 401),
        // The right password for another station's id.
        ("cs-3", "plain-password-0123", "connect", 401),
        ("cs-1", "plain-password-0123", "no-subprotocol", 400),
    ] {
        let steps = station(&csms.url, id, password, scenario).await;
        assert_eq!(steps[0]["refused"], status, "{id} {scenario}: {steps:?}");
    }
    assert!(
        csms.csms.stations().is_empty(),
        "no refused station was taken in"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_station_that_has_not_booted_is_answered_security_error() {
    let csms = start(&hashed_stations()).await;
    let steps = station(&csms.url, "cs-1", "plain-password-0123", "no-boot").await;
    assert_eq!(steps[1]["heartbeat_error"], "SecurityError", "{steps:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_is_recorded_with_the_energy_its_meter_read() {
    let csms = start(&hashed_stations()).await;
    let steps = station(&csms.url, "cs-1", "plain-password-0123", "charge").await;
    assert_eq!(steps[1]["authorize"], "Accepted", "{steps:?}");
    assert_eq!(steps[2]["event"], "Started");
    assert_eq!(steps[2]["id_token_info"]["status"], "Accepted");
    assert_eq!(steps[4]["event"], "Ended");

    let tx = csms.csms.stations()["cs-1"].transactions["tx-1"].clone();
    assert_eq!(tx.id_token.as_deref(), Some("ev-ocpp-1"));
    assert_eq!(tx.evse, Some(1));
    assert_eq!(tx.energy_wh, 10_000.0);
    assert_eq!(tx.stopped_reason.as_deref(), Some("EVDisconnected"));
    assert!(tx.started_at.is_some() && tx.ended_at >= tx.started_at);
}

/// A WebSocket upgrade to `path` as an OCPP station, with cs-1's credentials.
fn upgrade(url: &str, path: &str) -> tokio_tungstenite::tungstenite::handshake::client::Request {
    use base64::Engine as _;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
    use tokio_tungstenite::tungstenite::http::{HeaderValue, header};
    let mut request = format!("{url}{path}").into_client_request().unwrap();
    let basic = base64::engine::general_purpose::STANDARD.encode("cs-1:plain-password-0123");
    let headers = request.headers_mut();
    headers.insert(
        header::AUTHORIZATION,
        HeaderValue::from_str(&format!("Basic {basic}")).unwrap(),
    );
    headers.insert(
        header::SEC_WEBSOCKET_PROTOCOL,
        HeaderValue::from_static(evgrid_ocpp::server::SUBPROTOCOL),
    );
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_path_is_not_found() {
    use tokio_tungstenite::tungstenite::Error;
    let csms = start(&hashed_stations()).await;
    for path in ["/cs-1", "/ocpp", "/ocpp/cs-1/extra", "/ws/cs-1"] {
        let refused = tokio_tungstenite::connect_async(upgrade(&csms.url, path)).await;
        let Err(Error::Http(response)) = refused else {
            panic!("{path}: not refused with an HTTP status");
        };
        assert_eq!(response.status(), 404, "{path}");
        let body = String::from_utf8_lossy(response.body().as_deref().unwrap_or_default());
        assert!(body.contains("/ocpp/"), "{path}: {body}");
    }
    // The right path, with the same credentials, is let in.
    let (_socket, response) = tokio_tungstenite::connect_async(upgrade(&csms.url, "/ocpp/cs-1"))
        .await
        .unwrap();
    assert_eq!(
        response.headers()["sec-websocket-protocol"],
        evgrid_ocpp::server::SUBPROTOCOL
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_the_stations_connections_and_the_server_returns() {
    use futures::StreamExt as _;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    let csms = Csms::new(
        Stations::parse(&hashed_stations()).unwrap(),
        Settings::default(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    let server = tokio::spawn(serve_stations(csms.clone(), listener, stop.clone()));
    let (mut socket, _) = tokio_tungstenite::connect_async(upgrade(&url, "/ocpp/cs-1"))
        .await
        .unwrap();
    evgrid_test_support::eventually(Duration::from_secs(5), Duration::from_millis(20), || {
        let connected = csms.stations().get("cs-1").is_some_and(|s| s.connected);
        async move { connected.then_some(()) }
    })
    .await
    .expect("the station is seen connected");

    stop.cancel();
    let closed = tokio::time::timeout(Duration::from_secs(5), socket.next())
        .await
        .expect("the CSMS closes the connection within 5 s");
    match closed {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(frame.code, CloseCode::Away),
        other => panic!("not a Close frame: {other:?}"),
    }
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("the server returns once its connections are gone")
        .unwrap();
    assert!(!csms.stations()["cs-1"].connected);
}
