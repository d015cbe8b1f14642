//! `evgrid replay` on a live grid: a real pipeline records a few seconds of load, then the built
//! binary reads it back. The replay must find exactly the recorded arrivals (count, stored
//! times, energies), its as-recorded figures must be the request states', its export must
//! simulate as it does, and sent again to a staging grid the requests keep their pace. A second
//! grid records a limit change and a restarted substation, which the replay must show.

use async_nats::jetstream;
use chrono::{DateTime, Utc};
use evgrid_common::streams;
use evgrid_model::messages::{RequestRecord, RequestState};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use std::time::Duration;

use evgrid_test_support::eventually;

use crate::helpers::{WAIT, evgrid};
use crate::pipeline::{Options, Pipeline};

/// Each recorded request: its stored time, energy asked and state.
struct Stored {
    at: DateTime<Utc>,
    energy_kwh: f64,
    state: RequestRecord,
}

async fn recorded(js: &jetstream::Context) -> Vec<Stored> {
    let stream = js.get_stream(streams::REQUESTS).await.unwrap();
    let kv = js
        .get_key_value(streams::REQUEST_STATE_BUCKET)
        .await
        .unwrap();
    let n = crate::helpers::stored(js, streams::REQUESTS).await;
    let mut out = Vec::new();
    for seq in 1..=n {
        let msg = stream.get_raw_message(seq).await.unwrap();
        let body: Value = serde_json::from_slice(&msg.payload).unwrap();
        let id = body["request_id"].as_str().unwrap().parse().unwrap();
        let state = streams::read_request(&kv, id)
            .await
            .unwrap()
            .expect("every request has a state");
        out.push(Stored {
            at: DateTime::from_timestamp_nanos(msg.time.unix_timestamp_nanos() as i64),
            energy_kwh: body["energy_kwh"].as_f64().unwrap(),
            state,
        });
    }
    out
}

/// Three substations at 3600× (a real second is a simulated hour), heartbeats every 200 ms.
fn grid() -> Options<'static> {
    Options {
        capacities: &[50.0, 100.0, 150.0],
        time_scale: 3600.0,
        heartbeat_interval: "200ms",
        dispatcher_args: &["--defer-delay", "200ms"],
        ..Options::default()
    }
}

/// `evgrid replay --json` of everything `url` recorded at 3600×, with `extra` options.
async fn replay_json(url: &str, extra: &[&str]) -> Value {
    let mut args = vec![
        "replay",
        "--nats-url",
        url,
        "--time-scale",
        "3600",
        "--json",
    ];
    args.extend(extra);
    let (ok, out, err) = evgrid(&args).await;
    assert!(ok, "{err}");
    serde_json::from_str(&out).unwrap()
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-6 * a.abs().max(b.abs()).max(1.0)
}

fn time(v: &Value) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(v.as_str().unwrap())
        .unwrap()
        .to_utc()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_reads_back_what_the_live_grid_recorded() {
    let pipeline = Pipeline::start(grid()).await;
    let url = pipeline.nats.url().to_owned();
    let ingest = pipeline.url("");
    let args = crate::helpers::args(&[
        "--url",
        &ingest,
        "--events-nats-url",
        &url,
        "--rate",
        "20",
        "--duration",
        "2s",
        "--energy-kwh",
        "uniform:5..30",
        "--max-power-kw",
        "11",
        "--departure-hours",
        "uniform:1..5",
        "--seed",
        "7",
        "--wait-complete",
        "--complete-timeout",
        "15s",
    ]);
    let load = tokio::time::timeout(WAIT, evgrid::load::run(args, CancellationToken::new()))
        .await
        .expect("the load ends in time")
        .expect("the load runs");
    assert_eq!((load.accepted, load.errors.total), (40, 0));

    let js = jetstream::new(pipeline.nats.client().await.unwrap());
    let stored = recorded(&js).await;
    assert_eq!(stored.len(), 40);
    assert!(stored.iter().all(|s| s.state.state.is_final()));

    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("day.csv");
    let csv = csv.to_str().unwrap();
    let r = replay_json(&url, &["--export", csv]).await;

    // The arrivals, exactly as recorded.
    assert_eq!(r["arrivals"]["count"], 40);
    let asked: f64 = stored.iter().map(|s| s.energy_kwh).sum();
    assert!(close(r["arrivals"]["energy_kwh"].as_f64().unwrap(), asked));
    assert_eq!(time(&r["window"]["first"]), stored[0].at);
    assert_eq!(time(&r["window"]["last"]), stored[39].at);
    assert_eq!(
        (
            &r["window"]["first_sequence"],
            &r["window"]["last_sequence"]
        ),
        (&Value::from(1), &Value::from(40))
    );
    let ids: Vec<&str> = r["window"]["substations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["s1", "s2", "s3"]);
    // 200 ms of real time at 3600× is 720 simulated seconds.
    assert!(close(r["window"]["heartbeat_s"].as_f64().unwrap(), 720.0));

    // As recorded = the request states.
    let rec = &r["recorded"];
    let delivered: f64 = stored.iter().map(|s| s.state.energy_delivered_kwh).sum();
    assert!(close(
        rec["energy_delivered_kwh"].as_f64().unwrap(),
        delivered
    ));
    // Fully served as replay (and the simulator) counts it: completed `delivered` with all it
    // could take when it arrived. That lies between those completed with everything they asked
    // and those completed `delivered` at all: a request deferred, then charged best effort on a
    // later offer, completes `delivered` with less (a CI run slow enough to defer one found it).
    let completed = |strict: bool| {
        stored
            .iter()
            .filter(|s| {
                s.state.state == RequestState::Completed
                    && s.state.reason.as_deref() == Some("delivered")
                    && (!strict
                        || s.state.energy_delivered_kwh >= s.state.energy_kwh * (1.0 - 1e-6))
            })
            .count()
    };
    let full = rec["outcomes"]["delivered"].as_u64().unwrap() as usize;
    assert!(
        (completed(true)..=completed(false)).contains(&full),
        "{full} fully served, not within {}..={}",
        completed(true),
        completed(false)
    );
    assert!(close(
        rec["sessions_fully_served_ratio"].as_f64().unwrap(),
        full as f64 / 40.0
    ));
    assert_eq!(rec["outcomes"]["departed"], 40 - full);
    let per: Vec<&Value> = rec["per_substation"].as_array().unwrap().iter().collect();
    let requests: u64 = per.iter().map(|s| s["requests"].as_u64().unwrap()).sum();
    assert_eq!(requests, 40);
    let per_energy: f64 = per
        .iter()
        .map(|s| s["energy_delivered_kwh"].as_f64().unwrap())
        .sum();
    assert!(close(per_energy, delivered));
    // Rebuilt by the substations' own model: loaded, never above capacity.
    let peak = rec["peak_utilization"].as_f64().unwrap();
    assert!(peak > 0.0 && peak <= 1.0 + 1e-9, "{rec}");
    // Every field of a simulated result is in `recorded`, and the simulation ran.
    let sim = r["results"][0].as_object().unwrap();
    for field in sim.keys() {
        assert!(rec.get(field).is_some(), "recorded lacks {field}");
    }
    assert_eq!(r["results"][0]["capacity_violations"], 0);
    assert!(r["results"][0]["energy_delivered_kwh"].as_f64().unwrap() > 0.0);
    assert!(r["pooled_reference"].is_object());

    // A window after the last request is empty, at once.
    let later = (Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
    let (ok, _, err) = evgrid(&["replay", "--nats-url", &url, "--from", &later]).await;
    assert!(!ok);
    assert!(err.contains("no charge request in the window"), "{err}");

    // The text report says the same.
    let (ok, text, err) = evgrid(&["replay", "--nats-url", &url, "--time-scale", "3600"]).await;
    assert!(ok, "{err}");
    assert!(text.contains("as recorded (the live grid)"), "{text}");
    let row = text
        .lines()
        .find(|l| l.starts_with("recorded "))
        .expect("a recorded row");
    assert!(row.contains(" live "), "{text}");

    // The export is a trace that simulates exactly as the replay did.
    assert_eq!(r["export"]["rows"], 40);
    let sessions = evgrid_sim::trace::read(csv).unwrap();
    assert_eq!(sessions.len(), 40);
    for (s, rec) in sessions.iter().zip(&stored) {
        // On the simulated clock: an hour per real second since the first arrival.
        let real_ms = (rec.at - stored[0].at).num_microseconds().unwrap() as f64 / 1e3;
        let sim_ms = (s.arrival - sessions[0].arrival).num_milliseconds() as f64;
        assert!(
            (sim_ms - real_ms * 3600.0).abs() <= 1.0,
            "{sim_ms} vs {real_ms}"
        );
        assert_eq!(s.energy_kwh, rec.energy_kwh);
    }
    let (ok, out, err) = evgrid(&[
        "sim",
        "--trace",
        csv,
        "--vehicle-max-kw",
        "11",
        "--capacities",
        "50,100,150",
        "--heartbeat",
        "720s",
        "--json",
    ])
    .await;
    assert!(ok, "{err}");
    let offline: Value = serde_json::from_str(&out).unwrap();
    for field in [
        "energy_requested_kwh",
        "energy_delivered_kwh",
        "sessions_fully_served_ratio",
        "peak_utilization",
        "wait_p95_s",
        "capacity_violations",
    ] {
        assert_eq!(
            offline["results"][0][field], r["results"][0][field],
            "{field}"
        );
        assert_eq!(
            offline["pooled_reference"][field], r["pooled_reference"][field],
            "{field}"
        );
    }
    assert_eq!(
        offline["energy_upper_bound_kwh"],
        r["energy_upper_bound_kwh"]
    );

    // Sent again into a staging grid: the same requests at the same pace, with new ids.
    let staging = Pipeline::start(grid()).await;
    let staging_nats = staging.nats.url().to_owned();
    let (ok, out, err) = evgrid(&[
        "replay",
        "--nats-url",
        &url,
        "--to-url",
        &staging.url(""),
        "--wait-complete",
        "--to-events-nats-url",
        &staging_nats,
        "--json",
    ])
    .await;
    assert!(ok, "{err}");
    let load: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (&load["mode"], &load["accepted"], &load["completed"]),
        (&Value::from("trace"), &Value::from(40), &Value::from(40)),
        "{load}"
    );
    let js2 = jetstream::new(staging.nats.client().await.unwrap());
    let again = recorded(&js2).await;
    assert_eq!(again.len(), 40);
    for (a, b) in again.iter().zip(&stored) {
        assert_eq!(a.energy_kwh, b.energy_kwh);
        assert_ne!(a.state.request_id, b.state.request_id);
        let stay =
            |s: &Stored| (s.state.departure.unwrap() - s.state.accepted_at).num_milliseconds();
        assert!(
            (stay(a) - stay(b)).abs() < 1000,
            "{} vs {}",
            stay(a),
            stay(b)
        );
    }
    // The recorded pace (20 a second), give or take a scheduler's hiccup.
    let span = |s: &[Stored]| (s[39].at - s[0].at).num_milliseconds();
    assert!(
        (span(&again) - span(&stored)).abs() < 500,
        "{} ms vs {} ms",
        span(&again),
        span(&stored)
    );
    staging.stop().await;

    // Straight onto another server's ev.requests, four times as fast.
    let (bare, bare_js) = crate::helpers::nats_with_streams().await;
    let (ok, out, err) = evgrid(&[
        "replay",
        "--nats-url",
        &url,
        "--to-nats-url",
        bare.url(),
        "--speed",
        "4",
        "--json",
    ])
    .await;
    assert!(ok, "{err}");
    let load: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(load["accepted"], 40, "{load}");
    let bodies = crate::helpers::stored_requests(&bare_js).await;
    let energies: Vec<f64> = bodies
        .iter()
        .map(|b| b["energy_kwh"].as_f64().unwrap())
        .collect();
    let recorded_energies: Vec<f64> = stored.iter().map(|s| s.energy_kwh).collect();
    assert_eq!(energies, recorded_energies);
    let elapsed_ms = load["elapsed_s"].as_f64().unwrap() * 1e3;
    let quarter = span(&stored) as f64 / 4.0;
    assert!(
        (elapsed_ms - quarter).abs() < 500.0,
        "{elapsed_ms} ms vs {quarter} ms"
    );

    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_without_requests_or_upside_down_is_refused() {
    let (server, _js) = crate::helpers::nats_with_streams().await;
    let url = server.url();
    let (ok, _, err) = evgrid(&["replay", "--nats-url", url]).await;
    assert!(!ok);
    assert!(err.contains("no charge request in the window"), "{err}");
    let (ok, _, err) = evgrid(&[
        "replay",
        "--nats-url",
        url,
        "--from",
        "2026-12-05T10:00:00Z",
        "--until",
        "2026-12-05T09:00:00Z",
    ])
    .await;
    assert!(!ok);
    assert!(err.contains("is after --until"), "{err}");
    let (ok, _, err) = evgrid(&["replay", "--nats-url", url, "--from", "yesterday"]).await;
    assert!(!ok);
    assert!(err.contains("RFC 3339"), "{err}");
    // Nothing listens on port 1.
    let (ok, _, err) = evgrid(&["replay", "--nats-url", "nats://127.0.0.1:1"]).await;
    assert!(!ok);
    assert!(err.contains("cannot reach NATS"), "{err}");
}

/// Waits until `EV_REQUESTS` holds at least `n` requests.
async fn stored_at_least(js: &jetstream::Context, n: u64) {
    eventually(WAIT, Duration::from_millis(20), || async {
        (crate::helpers::stored(js, streams::REQUESTS).await >= n).then_some(())
    })
    .await
    .unwrap_or_else(|_| panic!("{n} requests stored within {WAIT:?}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_sees_a_limit_change_and_a_restarted_substation() {
    let mut pipeline = Pipeline::start(grid()).await;
    let url = pipeline.nats.url().to_owned();
    let js = jetstream::new(pipeline.nats.client().await.unwrap());
    // Long sessions (an hour or more at 11 kW: a second or more of real time), so the
    // substation restarted mid-load has cars charging.
    let args = crate::helpers::args(&[
        "--url",
        &pipeline.url(""),
        "--events-nats-url",
        &url,
        "--rate",
        "20",
        "--duration",
        "3s",
        "--energy-kwh",
        "uniform:15..40",
        "--max-power-kw",
        "11",
        "--departure-hours",
        "uniform:4..8",
        "--seed",
        "11",
        "--wait-complete",
        "--complete-timeout",
        "15s",
    ]);
    let load = tokio::spawn(evgrid::load::run(args, CancellationToken::new()));

    // A grid operator limits s3 to 40 kW a third of the way in; s2 restarts two thirds in.
    stored_at_least(&js, 20).await;
    js.publish(
        evgrid_model::subjects::limits("s3"),
        r#"{"capacity_kw": 40}"#.into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    stored_at_least(&js, 40).await;
    pipeline.restart_substation(1).await;
    let load = tokio::time::timeout(WAIT, load)
        .await
        .expect("the load ends in time")
        .unwrap()
        .expect("the load runs");
    assert_eq!((load.accepted, load.errors.total), (60, 0), "{load:?}");
    let stored = recorded(&js).await;
    assert!(stored.iter().all(|s| s.state.state.is_final()));

    let dir = tempfile::tempdir().unwrap();
    let svg = dir.path().join("load.svg");
    let r = replay_json(&url, &["--plot", svg.to_str().unwrap()]).await;
    assert!(std::fs::read_to_string(&svg).unwrap().starts_with("<svg"));
    assert_eq!(r["arrivals"]["count"], 60);
    assert_eq!(r["window"]["limit_messages"], 1);
    let rec = &r["recorded"];
    let delivered: f64 = stored.iter().map(|s| s.state.energy_delivered_kwh).sum();
    assert!(close(
        rec["energy_delivered_kwh"].as_f64().unwrap(),
        delivered
    ));
    let s2 = &rec["per_substation"][1];
    assert_eq!(s2["substation_id"], "s2");
    assert!(s2["interruptions"].as_u64().unwrap() > 0, "{s2}");
    assert!(s2["resumed"].as_u64().unwrap() > 0, "{s2}");
    for s in rec["per_substation"].as_array().unwrap() {
        let peak = s["peak_utilization"].as_f64().unwrap();
        assert!(peak <= 1.0 + 1e-9, "{s}");
    }
    let differences = r["differences"].to_string();
    assert!(
        differences.contains("s2:") && differences.contains("1 grid-operator limit"),
        "{differences}"
    );
    // The limit holds in the simulations as it did live.
    assert_eq!(r["results"][0]["capacity_violations"], 0);
    assert!(r["results"][0]["peak_utilization"].as_f64().unwrap() <= 1.0 + 1e-9);

    pipeline.stop().await;
}
