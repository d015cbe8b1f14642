//! The NATS contract from a third-party client: nats-py (PyPI, installed by
//! scripts/install-test-deps) stands in for the Go `nats` CLI, which is not installable here,
//! and runs the README's recipes against a live pipeline (`nats_client.py`).

use std::process::Command;
use std::time::Duration;

use crate::pipeline::{Options, Pipeline, password};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_third_party_client_submits_follows_reads_and_replays_a_request() {
    // On NATS with evgrid's roles: the request is published as `client`, the rest read as
    // `observer`, as the README's nats CLI contexts do.
    let pipeline = Pipeline::start(Options {
        secured: true,
        ..Options::default()
    })
    .await;
    let with_user = |user: &str| {
        pipeline
            .nats
            .url()
            .replacen("nats://", &format!("nats://{user}:{}@", password(user)), 1)
    };
    let (client_url, observer_url) = (with_user("client"), with_user("observer"));
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/cli/nats_client.py");
    let run = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::task::spawn_blocking(move || {
            Command::new(evgrid_test_support::python())
                .args([script, &client_url, &observer_url, "ev-nats-py"])
                .output()
        }),
    )
    .await
    .expect("the client finishes within 60 s")
    .unwrap()
    .expect("python3 runs");
    assert!(
        run.status.success(),
        "the nats-py client failed (scripts/install-test-deps installs nats-py):\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let seen: serde_json::Value = serde_json::from_slice(&run.stdout).expect("one JSON line");

    let fields = seen["heartbeat_fields"].as_array().unwrap();
    for field in [
        "substation_id",
        "seq",
        "sent_at",
        "capacity_kw",
        "load_kw",
        "active_sessions",
    ] {
        assert!(fields.iter().any(|f| f == field), "{field} in {fields:?}");
    }
    // The raw request (no request id) completed under the id derived from its stream sequence.
    let completed = &seen["completed"];
    assert_eq!(completed["event"], "completed");
    assert_eq!(completed["energy_delivered_kwh"], 5.0);
    let sequence = seen["replayed_sequence"].as_u64().unwrap();
    assert_eq!(
        completed["request_id"],
        evgrid_model::messages::request_id_from_sequence(sequence).to_string()
    );
    let state = &seen["state"];
    assert_eq!(state["state"], "completed");
    assert_eq!(state["request_id"], completed["request_id"]);
    assert_eq!(state["vehicle_id"], "ev-nats-py");
    pipeline.stop().await;
}
