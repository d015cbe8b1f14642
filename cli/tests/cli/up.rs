//! `evgrid up` as a user runs it: the built binary with a pinned nats-server on free ports comes
//! up, serves `/readyz`, completes a posted request, and leaves no process behind after SIGINT.

use std::process::Stdio;
use std::time::Duration;

use evgrid_test_support::{eventually, nats_server_bin};
use futures::StreamExt;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

/// Processes whose command line mentions `needle` (our temporary data directory).
fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        let zombie =
            std::fs::read_to_string(entry.path().join("stat")).is_ok_and(|s| s.contains(") Z "));
        if cmdline.contains(needle) && !zombie {
            found.push(cmdline);
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_runs_the_grid_completes_a_request_and_stops_cleanly_on_sigint() {
    let data = tempfile::tempdir().unwrap();
    let data_dir = data.path().to_str().unwrap().to_owned();
    let mut child = Command::new(env!("CARGO_BIN_EXE_evgrid"))
        .args([
            "up",
            "--nats-port",
            "0",
            "--metrics-base-port",
            "0",
            "--prometheus-port",
            "0",
        ])
        .args([
            "--ingest-listen",
            "127.0.0.1:0",
            "--time-scale",
            "3600",
            "--data-dir",
            &data_dir,
        ])
        .arg("--nats-server-bin")
        .arg(nats_server_bin())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    // The banner names where everything runs.
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let (mut api, mut nats) = (None, None);
    while api.is_none() || nats.is_none() {
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .expect("banner within 30 s")
            .unwrap()
            .expect("evgrid up exited before printing its banner");
        let word = |l: &str| l.split_whitespace().last().map(str::to_owned);
        if line.trim_start().starts_with("API (ingest)") {
            api = word(&line);
        } else if line.trim_start().starts_with("NATS ") {
            nats = word(&line);
        }
    }
    let (api, nats) = (api.unwrap(), nats.unwrap());
    // Keep draining stdout (the live line) so the process never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });

    let http = reqwest::Client::new();
    eventually(
        Duration::from_secs(30),
        Duration::from_millis(50),
        || async {
            let ready = http
                .get(format!("{api}/readyz"))
                .send()
                .await
                .ok()?
                .status()
                .is_success();
            let view: serde_json::Value = http
                .get(format!("{api}/v1/substations"))
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            let up = view
                .as_array()?
                .iter()
                .filter(|s| s["status"] == "up")
                .count();
            (ready && up == 3).then_some(())
        },
    )
    .await
    .expect("the grid is ready with 3 substations");

    let client = async_nats::connect(&nats).await.unwrap();
    let mut completed = client.subscribe("ev.sessions.*.completed").await.unwrap();
    client.flush().await.unwrap();
    let response = http
        .post(format!("{api}/v1/charge-requests"))
        .json(&serde_json::json!({"vehicle_id": "ev-up", "energy_kwh": 5, "max_power_kw": 11}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let id = response.json::<serde_json::Value>().await.unwrap()["request_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let done = tokio::time::timeout(Duration::from_secs(30), completed.next())
        .await
        .expect("the request completes within 30 s")
        .unwrap();
    let event: serde_json::Value = serde_json::from_slice(&done.payload).unwrap();
    assert_eq!(event["request_id"], id.as_str());
    drop(completed);
    drop(client);

    assert!(
        !processes_mentioning(&data_dir).is_empty(),
        "nats-server runs under the data dir"
    );
    let pid = child.id().unwrap();
    assert!(
        std::process::Command::new("kill")
            .args(["-INT", &pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
    let status = tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .expect("evgrid up stops within 15 s of SIGINT")
        .unwrap();
    assert!(status.success(), "clean exit, got {status}");
    assert_eq!(
        processes_mentioning(&data_dir),
        Vec::<String>::new(),
        "nothing left running"
    );
    assert!(
        data.path().join("nats").exists(),
        "the JetStream store is kept for the next run"
    );
}
