//! The CSMS endpoint driven by a real OCPP 2.0.1 client no one here wrote: the Python `ocpp`
//! package over `websockets` (`station.py`), against the real server on a real socket.

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use evgrid_ocpp::server::{Csms, Settings, routes};
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
    tokio::spawn(evgrid_common::http::serve(
        listener,
        routes(csms.clone()),
        stop.clone(),
    ));
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
