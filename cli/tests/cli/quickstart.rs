//! The README's quick start as a newcomer follows it, and `evgrid up` telling the truth: the
//! demo grid completes a request posted by hand and the README's 100-concurrent load command;
//! a foreign server on the Prometheus port is never shown as ours and never holds Ctrl-C; and
//! the binary copied anywhere still finds its demo trace and alert rules.

use std::path::Path;
use std::time::Duration;

use evgrid_test_support::eventually;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use crate::helpers::get_json;
use crate::pipeline::wait_until_grid_is_up;
use crate::up::UpProcess;

const README: &str = include_str!("../../../README.md");

/// The README's quick start API and NATS addresses, replaced by the test's own.
const README_API: &str = "http://127.0.0.1:8080";
const README_NATS: &str = "nats://127.0.0.1:4222";

/// The README's "What to look at" shell lines following the line that contains `marker`, with
/// `\` continuations joined: the command as a user would paste it.
fn readme_command(marker: &str) -> String {
    let mut lines = README.lines().skip_while(|l| !l.contains(marker));
    let mut command = String::new();
    // The marker's own line when it is a command, else the first line after the comments.
    let first = lines
        .next()
        .unwrap_or_else(|| panic!("README has no {marker:?}"));
    let mut line = first;
    while line.trim_start().starts_with('#') {
        line = lines.next().expect("a command after the comments");
    }
    loop {
        let trimmed = line.trim();
        match trimmed.strip_suffix('\\') {
            Some(part) => {
                command.push_str(part.trim());
                command.push(' ');
                line = lines.next().expect("a continuation line");
            }
            None => {
                command.push_str(trimmed);
                return command;
            }
        }
    }
}

/// Splits a README command into words, honouring single quotes (no other shell syntax is used).
fn words(command: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut quoted = false;
    for c in command.chars() {
        match c {
            '\'' => quoted = !quoted,
            ' ' if !quoted => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            c => word.push(c),
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    words
}

/// Posts the README's "submit a request" body to `api` and follows the request until it is
/// completed, within `wait`: its record then.
async fn post_readme_request_until_completed(
    http: &reqwest::Client,
    api: &str,
    wait: Duration,
) -> serde_json::Value {
    let post = words(&readme_command("# submit a request"));
    let body = &post[post.iter().position(|w| w == "-d").expect("curl -d") + 1];
    let id = crate::helpers::submit(http, api, body.clone()).await;
    eventually(wait, Duration::from_millis(250), || async {
        let record = get_json(http, &format!("{api}/v1/charge-requests/{id}")).await?;
        (record["state"] == "completed").then_some(record)
    })
    .await
    .unwrap_or_else(|e| panic!("the posted request completes within {wait:?}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_quick_start_completes_a_posted_request_and_the_100_car_load() {
    // `evgrid up --demo`, as the quick start runs it, on the test's free ports.
    let quick_start = readme_command("cargo run --release -p evgrid -- up");
    assert!(quick_start.ends_with("up --demo"), "{quick_start}");
    let up = UpProcess::start(&["--demo"]).await;
    let (api, nats) = (
        up.banner("API (ingest)").to_owned(),
        up.banner("NATS").to_owned(),
    );
    assert!(
        up.banner("Demo").contains("Caltech ACN"),
        "{}",
        up.banner("Demo")
    );
    let http = up.http();
    wait_until_grid_is_up(&http, &api, 3, Duration::from_secs(30)).await;

    // "submit a request, then follow it": the README's curl body, posted to this grid.
    let done = post_readme_request_until_completed(&http, &api, Duration::from_secs(120)).await;
    assert_eq!(done["fully_charged"], true, "{done}");

    // The README's 100-concurrent command, word for word but for the addresses.
    let load = readme_command("# the original 100-concurrent test")
        .replace(README_API, &api)
        .replace(README_NATS, &nats)
        .replace(".evgrid/", &format!("{}/", up.data_dir));
    let load = words(&load);
    let from = load.iter().position(|w| w == "load").expect("evgrid load");
    assert_eq!(
        load[..from].join(" "),
        "cargo run --release -p evgrid --",
        "the README runs evgrid through cargo"
    );
    let run = Command::new(env!("CARGO_BIN_EXE_evgrid"))
        .args(&load[from..])
        .env_remove("NATS_URL")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .expect("evgrid load finishes within 2 minutes")
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(report.contains("completed     100"), "{report}");
    up.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_ocpp_quick_start_charges_a_posted_request_at_a_simulated_station() {
    let quick_start = readme_command("cargo run --release -p evgrid -- up --chargers");
    assert!(quick_start.ends_with("up --chargers ocpp"), "{quick_start}");
    let up = UpProcess::start(&["--chargers", "ocpp", "--ocpp-base-port", "0"]).await;
    let api = up.banner("API (ingest)").to_owned();
    let ocpp = up.banner("substation-1 OCPP");
    assert!(
        ocpp.starts_with("ws://127.0.0.1:") && ocpp.contains("(20 simulated stations)"),
        "{ocpp}"
    );
    let http = up.http();
    wait_until_grid_is_up(&http, &api, 3, Duration::from_secs(30)).await;
    let done = post_readme_request_until_completed(&http, &api, Duration::from_secs(60)).await;
    // The energy is what the station's meter read: at least the 30 kWh asked for.
    let energy = done["energy_delivered_kwh"].as_f64().unwrap();
    assert!(energy >= 30.0 - 1e-3, "{done}");
    assert_eq!(done["fully_charged"], true, "{done}");
    let stations = std::fs::read_to_string(
        Path::new(&up.data_dir).join("credentials/ocpp-stations-substation-1"),
    )
    .unwrap();
    assert_eq!(stations.lines().count(), 20);
    up.stop().await;
}

/// A foreign server on a port: one that answers every request as a ready Prometheus (with
/// someone else's config), or one that accepts connections and never answers.
async fn foreign_server(answers: bool) -> (u16, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut socket, _)) = listener.accept().await {
            if answers {
                let body = r#"{"status":"success","data":{"config.file":"/etc/prometheus/prometheus.yml"}}"#;
                let reply = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = socket.write_all(reply.as_bytes()).await;
            } else {
                held.push(socket);
            }
        }
    });
    (port, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_server_on_the_prometheus_port_is_never_shown_and_never_holds_ctrl_c() {
    for answers in [true, false] {
        let (port, server) = foreign_server(answers).await;
        let port_arg = port.to_string();
        let up = UpProcess::start(&["--prometheus-port", &port_arg]).await;
        let shown = up.banner("Prometheus").to_owned();
        assert!(
            !shown.contains(&format!("127.0.0.1:{port}")),
            "answers={answers}: the banner names the foreign server: {shown}"
        );
        up.stop_within(Duration::from_secs(10)).await;
        server.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_copied_to_an_empty_directory_uses_the_real_trace_and_loads_the_rules() {
    let elsewhere = tempfile::tempdir().unwrap();
    let bin = elsewhere.path().join("evgrid");
    std::fs::copy(env!("CARGO_BIN_EXE_evgrid"), &bin).unwrap();
    let up = UpProcess::start_from(&bin, elsewhere.path(), &["--demo"]).await;
    let demo = up.banner("Demo");
    assert!(demo.contains("Caltech ACN sessions"), "{demo}");
    let prometheus = up.banner("Prometheus").to_owned();
    assert!(
        prometheus.starts_with("http://"),
        "evgrid up did not start Prometheus (install Debian's prometheus package): {prometheus}"
    );
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let rules = eventually(
        Duration::from_secs(30),
        Duration::from_millis(200),
        || async {
            let body = get_json(&http, &format!("{prometheus}/api/v1/rules")).await?;
            let groups = body["data"]["groups"].as_array()?.clone();
            (!groups.is_empty()).then_some(groups)
        },
    )
    .await
    .expect("Prometheus loads evgrid's rules");
    for group in &rules {
        let file = group["file"].as_str().unwrap_or_default();
        assert!(
            Path::new(file).starts_with(&up.data_dir) || file.starts_with("rules/"),
            "a rule file outside the data directory: {file}"
        );
        assert!(!group["rules"].as_array().unwrap().is_empty());
    }
    up.stop().await;
}
